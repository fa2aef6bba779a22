"""RetinaNet = ResNet + FPN + class/box heads; the one model entry point.

Top-level parameter tree: backbone (resnet.py), fpn (fpn.py), cls_head and box_head (heads.py).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from retina_jax import sharding
from retina_jax.models import fpn as fpn_lib
from retina_jax.models import heads
from retina_jax.models import resnet

_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f'Unknown config.model.dtype {name!r}; expected one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


class RetinaNet(nn.Module):
  """images [B, H, W, 3] (normalized, H and W multiples of 32) ->
  {'cls_logits': [B, N, K] float32, 'box_deltas': [B, N, 4] float32}, N = total anchors in the
  anchor order of config.py (levels min..max, row-major (y, x), then the A anchors).

  `model_cfg` is `config.model`. Parameters are float32; activations use `model_cfg.dtype`.
  `mesh`: the mesh the model runs on, or None. Its feature maps name their axes
  (layers.FEATURE_MAP) and are laid out on `mesh` by sharding.py's rules: with
  config.mesh.model_parallelism > 1 their rows are split over the 'model' axis (spatial
  partitioning), small maps excepted. The outputs stay split too (XLA moves them into the
  loss's layout): the per-anchor [B, N, K] tensors dominate the per-chip memory.
  """
  model_cfg: Any
  num_anchors: int
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    with sharding.logical_axes(self.mesh):
      cfg = self.model_cfg
      dtype = compute_dtype(cfg.dtype)
      features = resnet.ResNet(backbone=cfg.backbone, norm=cfg.norm, freeze_at=cfg.freeze_at,
                               dtype=dtype, name='backbone')(images, train=train)
      pyramid = fpn_lib.FPN(channels=cfg.fpn_channels, min_level=cfg.min_level,
                            max_level=cfg.max_level, p6_from=cfg.p6_from, dtype=dtype,
                            name='fpn')(features)
      levels = [pyramid[f'p{l}'] for l in range(cfg.min_level, cfg.max_level + 1)]
      head = lambda per_anchor, bias_init, name: heads.Head(
          self.num_anchors, per_anchor, channels=cfg.head_channels, num_convs=cfg.head_convs,
          out_bias_init=bias_init, norm=cfg.head_norm, dtype=dtype, name=name)
      cls_logits = head(cfg.num_classes, heads.prior_bias(cfg.prior_prob), 'cls_head')(levels)
      box_deltas = head(4, nn.initializers.zeros, 'box_head')(levels)
      return {'cls_logits': cls_logits, 'box_deltas': box_deltas}


def create_model(config: ml_collections.ConfigDict, mesh=None) -> RetinaNet:
  """The model of a full config: `config.model` plus A from `config.anchors`, laid out on the
  `mesh` it runs on (RetinaNet)."""
  num_anchors = len(config.anchors.scales) * len(config.anchors.aspect_ratios)
  return RetinaNet(model_cfg=ml_collections.FrozenConfigDict(config.model),
                   num_anchors=num_anchors, mesh=mesh)


def init_variables(model: RetinaNet, rng: jax.Array, image_size) -> dict:
  """{'params': ..., 'batch_stats': ...} for images of `image_size` (int or (h, w)), batch 1.

  Jitted so that initializing a ResNet-50 does not run a forward pass op by op.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, images, train=False))(rng)
  return dict(variables)


def frozen_mask(params, freeze_at: int):
  """A pytree like `params` of bools: True where a parameter must not be trained.

  freeze_at 0: nothing; 1: the stem (backbone conv1, bn1); 2: the stem and layer1 (res2).
  """
  def is_frozen(path, _):
    keys = [str(getattr(k, 'key', k)) for k in path]
    if len(keys) < 2 or keys[0] != 'backbone':
      return False
    return ((freeze_at >= 1 and keys[1] in ('conv1', 'bn1'))
            or (freeze_at >= 2 and keys[1].startswith('layer1_')))

  return jax.tree_util.tree_map_with_path(is_frozen, params)
