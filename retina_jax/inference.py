"""The detector as one jitted function, and the step back to original-image pixels.

Order of the box operations from model output to COCO file:
  1. `postprocess` decodes the deltas against the anchors and clips the boxes to the valid
     resized region `image_hw` of the padded image BEFORE the score threshold, top-k and NMS,
     so that NMS compares the boxes that are finally reported (torchvision and detectron2 clip
     there too);
  2. `to_original_coords` divides by the per-axis resize scale and clips once more, to the
     original image: under config.data.resize='pil' the resized region is round(original *
     scale) pixels, so a box at its edge may end up to half a resized pixel past the original
     border ('torchvision' maps back by the ratio of the sides, as torchvision does).
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import anchors as anchors_lib
from retina_jax import postprocess as postprocess_lib
from retina_jax.data import preprocess
from retina_jax import models

DetectFn = Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]


def make_detect_fn(config, model=None) -> DetectFn:
  """`detect(variables, images, image_hw) -> dets`, jitted; compiled once per input shape.

  Args:
    config: the full config (model, anchors, box_coder, postprocess, data.pixel_mean/std).
    model: an already built model; `create_model(config)` when None.

  `detect`'s arguments:
    variables: {'params': ..., 'batch_stats': ...} (any nested dicts of arrays).
    images: [B, S_h, S_w, 3] RGB, uint8 (float32 under config.data.resize='torchvision'),
      padded with zeros at the bottom/right; S_h and S_w
      multiples of 32. The anchors are a trace-time constant for that size.
    image_hw: [B, 2] int32 (h, w) of the valid resized region of each image.
  and result (padded-image pixels):
    {'boxes': [B, D, 4] float32 (x1, y1, x2, y2), 'scores': [B, D] float32,
     'labels': [B, D] int32 contiguous, 'valid': [B, D] bool}, D = postprocess.max_detections.
  """
  model = model if model is not None else models.create_model(config)
  mean = tuple(float(v) for v in config.data.pixel_mean)
  std = tuple(float(v) for v in config.data.pixel_std)
  min_level, max_level = config.model.min_level, config.model.max_level

  @jax.jit
  def detect(variables, images, image_hw):
    image_size = images.shape[1:3]
    anchors = anchors_lib.generate_anchors(config.anchors, min_level, max_level, image_size)
    level_sizes = anchors_lib.anchors_per_level(config.anchors, min_level, max_level,
                                                image_size)
    x = preprocess.normalize_images(images, image_hw, mean, std)
    out = model.apply(variables, x, train=False)
    return postprocess_lib.postprocess(out['cls_logits'], out['box_deltas'], jnp.asarray(anchors),
                                       level_sizes, image_hw, config.postprocess,
                                       config.box_coder)

  return detect


def to_original_coords(dets: Mapping[str, Any], scale, orig_hw) -> dict[str, np.ndarray]:
  """Boxes from resized-and-padded pixels to original-image pixels, clipped to the image.

  Args:
    dets: {'boxes': [B, D, 4] (x1, y1, x2, y2) padded-image pixels, 'scores', 'labels',
      'valid' ...} as `detect` returns (host or device arrays).
    scale: [B, 2] float (sy, sx), resized = original * s per axis (the batch's 'scale').
    orig_hw: [B, 2] int (h, w) of the original images.
  Returns:
    The same dict as numpy arrays, 'boxes' [B, D, 4] (x1, y1, x2, y2) original-image pixels.
  """
  out = {k: np.asarray(v) for k, v in dets.items()}
  scale = np.asarray(scale, np.float32)
  orig_hw = np.asarray(orig_hw, np.float32)
  boxes = out['boxes'] / np.stack([scale[:, 1], scale[:, 0]] * 2, axis=-1)[:, None, :]
  upper = np.stack([orig_hw[:, 1], orig_hw[:, 0]] * 2, axis=-1)[:, None, :]  # [B, 1, 4] w h w h
  out['boxes'] = np.clip(boxes, 0.0, upper).astype(np.float32)
  return out

