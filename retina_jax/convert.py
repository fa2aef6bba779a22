"""torchvision state dicts -> our variables {'params', 'batch_stats'}, stored as flax msgpack.

Accepted inputs (a plain `torch.save(model.state_dict())`, with or without `num_batches_tracked`,
or a training checkpoint holding one: see `load_torch_state_dict`):
- a torchvision ResNet ImageNet classifier (resnet18/34/50/101): the backbone only; `fc.*` is
  reported as unused;
- a torchvision `retinanet_resnet50_fpn` (v1) detector: backbone.body.*, backbone.fpn.*, head.*,
  in the current key layout (`inner_blocks.0.0.weight`, `conv.0.0.weight`) or the older one of the
  published checkpoint (`inner_blocks.0.weight`, `conv.0.weight`, `conv.2.weight`, ...);
- a torchvision `retinanet_resnet50_fpn_v2` detector (P6 from C5, GroupNorm heads: `conv.{j}.1`).

The architecture (depth, FPN levels and width, P6 source, classes, anchors) is read off the keys
and shapes; the expected variables then come from our own model (`jax.eval_shape`, no compute),
and every expected leaf is looked up under its torchvision name. So "missing" means a tensor our
model has and the file lacks, "unexpected" a tensor in the file nobody reads.

The output loads without torch (`load_variables`).

The other way, `to_torchvision` gives the state dict (and the builder and its arguments) that
torchvision's own model loads with strict=True, from the same key mapping (`_torch_keys`), for the
configs torchvision has a model for (`torchvision_builder` says which fields must hold).
"""

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from retina_jax import config as config_lib
from retina_jax import fileio
from retina_jax.models import resnet as resnet_lib
from retina_jax.models import retinanet as retinanet_lib

_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}
_DEPTHS = {((1, 1, 1, 1), False): 'tiny', ((2, 2, 2, 2), False): 'resnet18',
           ((3, 4, 6, 3), False): 'resnet34', ((3, 4, 6, 3), True): 'resnet50',
           ((3, 4, 23, 3), True): 'resnet101'}
_HEADS = {'cls_head': ('head.classification_head.', 'cls_logits'),
          'box_head': ('head.regression_head.', 'bbox_reg')}


@dataclasses.dataclass
class Report:
  kind: str  # 'resnet' (ImageNet classifier, backbone only) or 'retinanet'.
  architecture: dict[str, Any]  # The config.model fields read off the state dict.
  num_converted: int
  missing: list[str]  # torchvision names of tensors our model has and the input lacks.
  unexpected: list[str]  # Input keys nothing was converted from.


def _torch_keys(path: tuple[str, ...], body: str, min_level: int) -> list[str]:
  """torchvision names a leaf of our tree may have, current layout first.

  path: (module, ..., leaf) without the collection, e.g. ('backbone', 'layer1_0', 'bn1', 'var').
  """
  module, *rest, leaf = path
  name = _LEAF_NAMES[leaf]
  if module == 'backbone':
    sub = rest[0]
    m = re.fullmatch(r'layer(\d)_(\d+)', sub)
    if m:
      block = f'layer{m[1]}.{m[2]}.'
      layer = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(
          rest[1], rest[1])
      return [f'{body}{block}{layer}.{name}']
    return [f'{body}{sub}.{name}']
  if module == 'fpn':
    sub = rest[0]
    m = re.fullmatch(r'(lateral_c|output_p)(\d)', sub)
    if m:
      blocks = 'inner_blocks' if m[1] == 'lateral_c' else 'layer_blocks'
      i = int(m[2]) - min_level
      return [f'backbone.fpn.{blocks}.{i}.0.{name}', f'backbone.fpn.{blocks}.{i}.{name}']
    return [f'backbone.fpn.extra_blocks.{sub}.{name}']
  prefix, out_name = _HEADS[module]
  sub = rest[0]
  if sub == 'out':
    return [f'{prefix}{out_name}.{name}']
  if sub.startswith('norm'):  # GroupNorm heads (v2): Conv2dNormActivation's norm layer.
    return [f'{prefix}conv.{sub[len("norm"):]}.1.{name}']
  j = int(sub[len('conv'):])
  # Before torchvision 0.13 a head conv was conv.{2j} of a (conv, relu, ...) Sequential.
  return [f'{prefix}conv.{j}.0.{name}', f'{prefix}conv.{2 * j}.{name}']


def _find(sd: Mapping[str, Any], *candidates: str):
  for key in candidates:
    if key in sd:
      return sd[key]
  raise ValueError(f'RetinaNet state dict lacks {candidates[0]!r}, needed to read its '
                   'architecture.')


def _infer_architecture(sd: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(kind, config.model fields plus num_anchors) of a torchvision ResNet or RetinaNet."""
  body = 'backbone.body.' if any(k.startswith('backbone.body.') for k in sd) else ''
  blocks = [0, 0, 0, 0]
  for k in sd:
    if m := re.match(re.escape(body) + r'layer([1-4])\.(\d+)\.', k):
      blocks[int(m[1]) - 1] = max(blocks[int(m[1]) - 1], int(m[2]) + 1)
  bottleneck = any(re.match(re.escape(body) + r'layer\d\.\d+\.conv3\.', k) for k in sd)
  backbone = _DEPTHS.get((tuple(blocks), bottleneck))
  if backbone is None:
    raise ValueError(
        f'Not a torchvision ResNet-18/34/50/101 or RetinaNet state dict: blocks per stage '
        f'{tuple(blocks)}, bottleneck={bottleneck} (looked for keys like '
        f'{body}layer1.0.conv1.weight).')
  if not body:
    return 'resnet', {'backbone': backbone}

  ids = lambda pattern: {m[1] for k in sd if (m := re.match(pattern, k))}
  num_inner = len(ids(r'backbone\.fpn\.inner_blocks\.(\d+)\.'))
  extra = [int(i) for i in ids(r'backbone\.fpn\.extra_blocks\.p(\d)\.weight$')]
  cls_out = _find(sd, 'head.classification_head.cls_logits.weight').shape  # [A * K, C, 3, 3]
  num_anchors = _find(sd, 'head.regression_head.bbox_reg.weight').shape[0] // 4
  fpn_channels = _find(sd, 'backbone.fpn.inner_blocks.0.0.weight',
                       'backbone.fpn.inner_blocks.0.weight').shape[0]
  p6_in = _find(sd, 'backbone.fpn.extra_blocks.p6.weight').shape[1] if extra else fpn_channels
  return 'retinanet', {
      'backbone': backbone,
      'num_classes': cls_out[0] // num_anchors,
      'fpn_channels': fpn_channels,
      'head_channels': cls_out[1],
      # conv.{j}.0 (current) or conv.{2j} (old): one distinct id per conv either way.
      'head_convs': len(ids(r'head\.classification_head\.conv\.(\d+)\.')),
      # v2's heads: conv.{j}.0 (no bias), GroupNorm conv.{j}.1.
      'head_norm': 'gn' if ids(r'head\.classification_head\.conv\.(\d+)\.1\.weight$') else 'none',
      'min_level': 6 - num_inner,
      'max_level': max(extra, default=5),
      # torchvision v1's LastLevelP6P7(256, 256) reads P5, (2048, 256) would read C5.
      'p6_from': 'p5' if p6_in == fpn_channels else 'c5',
      'num_anchors': num_anchors,
  }


def _expected_variables(kind: str, arch: dict[str, Any], norm: str):
  """ShapeDtypeStructs of our variables for this architecture, from eval_shape (no compute)."""
  cfg = config_lib.get_base_config().model
  cfg.update({k: v for k, v in arch.items() if k != 'num_anchors'})
  cfg.norm = norm
  cfg.dtype = 'float32'
  side = 2 ** cfg.max_level
  images = jnp.zeros((1, side, side, 3), jnp.float32)
  if kind == 'resnet':
    model = resnet_lib.ResNet(backbone=cfg.backbone, norm=norm, dtype=jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    return {col: {'backbone': tree} for col, tree in shapes.items()}
  model = retinanet_lib.RetinaNet(ml_collections.FrozenConfigDict(cfg), arch['num_anchors'])
  return dict(jax.eval_shape(lambda: model.init(jax.random.key(0), images)))


def convert_state_dict(state_dict: Mapping[str, Any], norm: str = 'frozen_bn'):
  """torchvision state dict (name -> array-like) -> (variables, Report).

  norm: 'frozen_bn' puts BN weight/bias/mean/var in 'batch_stats'; 'bn' makes weight/bias
  trainable params of flax BatchNorm. Raises ValueError naming the key on a shape mismatch.
  """
  if norm not in ('frozen_bn', 'bn'):
    raise ValueError(f'norm must be frozen_bn or bn (torchvision has no GroupNorm ResNet), '
                     f'got {norm!r}.')
  sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  kind, arch = _infer_architecture(sd)
  body = 'backbone.body.' if kind == 'retinanet' else ''
  expected = _expected_variables(kind, arch, norm)
  used, missing = set(), []

  def convert_leaf(path, spec):
    keys = [str(k.key) for k in path]
    candidates = _torch_keys(tuple(keys[1:]), body, arch.get('min_level', 3))
    key = next((c for c in candidates if c in sd), None)
    if key is None:
      missing.append(candidates[0])
      return None
    used.add(key)
    value = sd[key]
    if keys[-1] == 'kernel' and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # torch OIHW -> flax HWIO.
    if value.shape != spec.shape:
      raise ValueError(f'Shape mismatch for {key!r}: {tuple(sd[key].shape)} in the state dict, '
                       f'but {"/".join(keys)} needs {spec.shape} '
                       f'({"HWIO from torch OIHW" if keys[-1] == "kernel" else "as is"}).')
    return value.astype(np.float32)

  converted = jax.tree_util.tree_map_with_path(convert_leaf, expected)
  variables = _prune(converted)
  unexpected = sorted(set(sd) - used)
  report = Report(kind=kind, architecture=dict(arch),
                  num_converted=len(used), missing=sorted(missing), unexpected=unexpected)
  return variables, report


def _prune(tree):
  """Drops None leaves and emptied sub-dicts (the tensors the input lacked)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: _prune(v) for k, v in tree.items() if v is not None}
  return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


# Where training scripts nest the state dict in a checkpoint: torchvision's detection references
# and detectron2 ('model'), Lightning and many others ('state_dict').
_NESTED_KEYS = ('model', 'state_dict')


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict as numpy arrays (needs torch; nothing else here does).

  Besides a plain `torch.save(model.state_dict())`, takes a training checkpoint that nests it
  under 'model' or 'state_dict' (torchvision's reference scripts save {'model', 'optimizer',
  'lr_scheduler', 'args', 'epoch'}), and drops the 'module.' prefix that DistributedDataParallel
  puts on every key. Loads with `weights_only=True` (no arbitrary code from the file; the
  reference scripts' argparse.Namespace is allowed).
  """
  import argparse  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  try:
    with torch.serialization.safe_globals([argparse.Namespace]), fileio.Path(path).open('rb') as f:
      obj = torch.load(f, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise ValueError(f'{path}: no such file.') from None
  except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'{path}: not a state dict torch can load as weights only ({first}). '
                     'Save the weights with torch.save(model.state_dict(), path).') from None
  if isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
    nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
    if nested:
      obj = obj[nested[0]]
  if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
    what = (f'a mapping with keys {sorted(map(str, obj))[:8]}' if isinstance(obj, Mapping)
            else type(obj).__name__)
    raise ValueError(f'{path}: expected a state dict (names to tensors), or a checkpoint with '
                     f'one under {" or ".join(map(repr, _NESTED_KEYS))}; got {what}.')
  if all(k.startswith('module.') for k in obj):
    obj = {k[len('module.'):]: v for k, v in obj.items()}
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items()}


def save_variables(variables, path: str) -> None:
  fileio.write_atomic(path, flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, variables)))


def load_variables(path: str) -> dict:
  """{'params': ..., 'batch_stats': ...} (numpy leaves) written by `save_variables`."""
  # Local files and gs:// alike (pods keep their weights in a bucket).
  return flax.serialization.msgpack_restore(fileio.Path(path).read_bytes())


def restore_into(variables, loaded):
  """Overwrites the leaves of `variables` that `loaded` has (e.g. converted ImageNet weights).

  Returns (new variables, paths not in `loaded`, paths of `loaded` not in `variables`).
  Raises ValueError naming the path on a shape mismatch.
  """
  flat = traverse_util.flatten_dict(variables, sep='/')
  new = traverse_util.flatten_dict(loaded, sep='/')
  for path, value in new.items():
    if path in flat and np.shape(value) != np.shape(flat[path]):
      raise ValueError(f'Shape mismatch for {path}: {np.shape(value)} loaded, model has '
                       f'{np.shape(flat[path])}.')
  merged = {p: (jnp.asarray(new[p], flat[p].dtype) if p in new else v) for p, v in flat.items()}
  not_loaded = sorted(set(flat) - set(new))
  unused = sorted(set(new) - set(flat))
  # Empty collections stay: a GroupNorm model's batch_stats is {} and the train state needs it.
  skeleton = traverse_util.flatten_dict(variables, keep_empty_nodes=True, sep='/')
  return traverse_util.unflatten_dict({**skeleton, **merged}, sep='/'), not_loaded, unused


# What torchvision's RetinaNet builders fix and a state dict cannot carry (config field -> the
# value torchvision computes with): a config must hold all of them for torchvision's model to give
# our detections. Post-processing and the resize sizes are arguments of the builder instead
# (`torchvision_kwargs`).
_TORCHVISION_FIXED = {
    'model.backbone': 'resnet50', 'model.fpn_channels': 256, 'model.head_channels': 256,
    'model.head_convs': 4, 'model.min_level': 3, 'model.max_level': 7,
    'anchors.sizes': (32.0, 64.0, 128.0, 256.0, 512.0),
    'anchors.scales': (1.0, 2 ** (1 / 3), 2 ** (2 / 3)), 'anchors.aspect_ratios': (0.5, 1.0, 2.0),
    'anchors.order': 'ratio_major', 'anchors.offset': 0.0, 'anchors.truncate_sizes': True,
    'anchors.round_base': True, 'anchors.stride_rule': 'image_over_grid',
    'box_coder.weights': (1.0, 1.0, 1.0, 1.0), 'box_coder.clamp': math.log(1000.0 / 16),
}
# torchvision's two RetinaNet builders (torchvision.models.detection.<name>), told apart by these.
TORCHVISION_BUILDERS = {
    'retinanet_resnet50_fpn': {'model.p6_from': 'p5', 'model.head_norm': 'none'},
    'retinanet_resnet50_fpn_v2': {'model.p6_from': 'c5', 'model.head_norm': 'gn'},
}
# Both build the ResNet with BatchNorm2d (FrozenBatchNorm2d with pretrained weights): in eval
# mode either is our frozen_bn / bn with its running statistics.
_TORCHVISION_NORMS = ('frozen_bn', 'bn')


def _field(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _same(a, b) -> bool:
  if isinstance(b, tuple):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(b, float):
    return math.isclose(float(a), b, rel_tol=1e-9, abs_tol=1e-12)
  return a == b


def torchvision_builder(config) -> str:
  """The torchvision builder whose model computes what `config` computes: P6 from P5 is
  `retinanet_resnet50_fpn`, P6 from C5 `retinanet_resnet50_fpn_v2`. Raises ValueError, one line
  naming the first field that must change, for a config torchvision has no model for."""
  p6_from = config.model.p6_from
  builder = next((b for b, fields in TORCHVISION_BUILDERS.items()
                  if fields['model.p6_from'] == p6_from), None)
  if builder is None:
    raise ValueError(f'config.model.p6_from={p6_from!r}: torchvision has RetinaNet only with P6 '
                     'from p5 (retinanet_resnet50_fpn) or c5 (retinanet_resnet50_fpn_v2).')
  for field, want in _TORCHVISION_FIXED.items():
    if not _same(got := _field(config, field), want):
      raise ValueError(f'config.{field}={got!r}: torchvision\'s RetinaNet needs {want!r}.')
  if config.model.norm not in _TORCHVISION_NORMS:
    raise ValueError(f'config.model.norm={config.model.norm!r}: torchvision\'s RetinaNet has a '
                     f'batch-norm ResNet; it needs one of {_TORCHVISION_NORMS}.')
  for field, want in TORCHVISION_BUILDERS[builder].items():
    if not _same(got := _field(config, field), want):
      raise ValueError(f'config.{field}={got!r}: torchvision\'s {builder} (the one with '
                       f'config.model.p6_from={p6_from!r}) needs {want!r}.')
  return builder


def torchvision_kwargs(config) -> dict[str, Any]:
  """The builder's arguments that make its transform and post-processing ours (besides
  weights=None, weights_backbone=None)."""
  pp = config.postprocess
  return {'num_classes': int(config.model.num_classes),
          'min_size': int(config.data.min_size), 'max_size': int(config.data.max_size),
          # torchvision normalises images in [0, 1]; ours are in [0, 255].
          'image_mean': [float(m) / 255 for m in config.data.pixel_mean],
          'image_std': [float(s) / 255 for s in config.data.pixel_std],
          'score_thresh': float(pp.score_threshold), 'nms_thresh': float(pp.nms_iou),
          'detections_per_img': int(pp.max_detections), 'topk_candidates': int(pp.pre_nms_topk)}


def to_torchvision(variables, config) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
  """Our variables -> (builder, its kwargs, the state dict its model loads with strict=True).

  The inverse of `convert_state_dict`: every leaf under its current-layout torchvision name
  (`_torch_keys`), kernels HWIO -> OIHW, and the `num_batches_tracked` step counter (0) that
  torch's BatchNorm2d keeps next to its statistics. Raises ValueError as `torchvision_builder`.
  """
  builder = torchvision_builder(config)
  state_dict = {}
  for path, value in traverse_util.flatten_dict(dict(variables)).items():
    tree_path = tuple(str(k) for k in path[1:])  # Without the collection.
    key = _torch_keys(tree_path, 'backbone.body.', config.model.min_level)[0]
    value = np.asarray(value, np.float32)
    if tree_path[-1] == 'kernel':
      value = np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # flax HWIO -> torch OIHW.
    state_dict[key] = value
    if tree_path[-1] == 'mean':
      state_dict[key.removesuffix('running_mean') + 'num_batches_tracked'] = np.zeros((), np.int64)
  return builder, torchvision_kwargs(config), state_dict
