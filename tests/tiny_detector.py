"""A tiny detector for the evaluation/export/predict tests: config and random variables.

The variables are drawn with numpy over `jax.eval_shape` of the model's init (well under a
second) instead of running the jitted init; random weights give scores near 0.5, so that every
image has detections above the score threshold.
"""

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import config as config_lib
from retina_jax import models
from retina_jax.data.categories import CategoryMap

# Non-contiguous ids on purpose: detections must carry the data set's ids, not labels.
CATEGORIES = CategoryMap(ids=(4, 9, 40), names=('circle', 'square', 'triangle'))


def tiny_config(image_size: int = 128):
  config = config_lib.get_base_config()
  config.model.backbone = 'tiny'
  config.model.num_classes = CATEGORIES.num_classes
  config.model.norm = 'gn'
  config.model.freeze_at = 0
  config.model.fpn_channels = 16
  config.model.head_channels = 16
  config.model.head_convs = 1
  config.model.dtype = 'float32'
  config.anchors.sizes = (16.0, 32.0, 64.0, 128.0, 256.0)
  config.data.image_size = image_size
  config.data.min_size = image_size
  config.data.max_size = image_size
  config.data.max_boxes = 8
  config.data.num_workers = 1
  config.eval_batch_size = 4
  config.postprocess.pre_nms_topk = 50
  config.postprocess.max_detections = 12
  return config


def random_variables(config, seed: int = 0) -> dict:
  """{'params': ..., 'batch_stats': ...} of numpy arrays with the model's exact tree."""
  model = models.create_model(config)
  size = config.data.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                           dict(shapes))
  variables.setdefault('batch_stats', {})
  return variables


def random_images(n: int, size: int, seed: int = 0):
  """uint8 [n, size, size, 3] padded images and their int32 [n, 2] valid (h, w)."""
  rng = np.random.default_rng(seed)
  hw = rng.integers(size // 2, size + 1, (n, 2)).astype(np.int32)
  images = np.zeros((n, size, size, 3), np.uint8)
  for i, (h, w) in enumerate(hw):
    images[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
  return images, hw
