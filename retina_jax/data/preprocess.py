"""One source example -> one row of the host batch; the body of `preprocess` is the order in
which the resize rule, the canvas and the training augmentations apply. Normalisation happens
later, on the device (`normalize_images`), so the host ships 1 byte per channel (4 under
config.data.resize='torchvision').

The augmentations are drawn and applied by `retina_jax.data.augment`, the resize by
`retina_jax.data.resize`; the canvas comes from `retina_jax.data.canvas`.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax.data import augment
from retina_jax.data import resize


def preprocess(example: dict, data_config, *, flip: bool = False,
               draw: augment.Draw | None = None, canvas: tuple[int, int] | None = None,
               image_out: np.ndarray | None = None) -> dict[str, Any]:
  """One source example -> one row of the host batch (layouts: `retina_jax.data.pipeline`).

  example: 'image' uint8 [H, W, 3]; 'boxes' float32 [n, 4] (x1, y1, x2, y2) original pixels;
    'labels' int32 [n]; 'is_crowd' bool [n]; 'image_id' int.
  data_config: config.data (min_size, max_size, image_size S, max_boxes, resize,
    crop_min_visible).
  flip: mirror left-right. draw: the training augmentation (`augment.draw`); None (evaluation,
    prediction): the plain resize.
  canvas: (Hc, Wc) of the padded image; (S, S) when None. Must hold the resized image, unless
    `draw` jitters the scale (then a larger image is cropped into it).
  image_out: optional all-zero [Hc, Wc, 3] array of `resize.image_dtype` to write the padded
    image into (a row of the batch array, which saves copying megabytes per image at 800 px).
  Either way 'scale' is the applied resize (resized = original * s per axis, before any crop),
  'image_hw' the valid region and 'cropped_out' the objects and crowd regions the crop dropped.
  """
  s, max_size, rule = int(data_config.image_size), int(data_config.max_size), data_config.resize
  canvas = (s, s) if canvas is None else tuple(canvas)
  image, boxes = example['image'], example['boxes'].astype(np.float32)
  labels, is_crowd = example['labels'], np.asarray(example['is_crowd'], bool)
  orig_hw = image.shape[:2]

  # 1. Quarter turns of the original.
  if draw is not None and draw.rot90:
    image, boxes = augment.rot90(image, boxes, draw.rot90)

  # 2. The resize rule, with the drawn shorter side (multi-scale training) and every size of
  # the rule times the drawn jitter (scale jitter; what passes the canvas is cropped in 3).
  if draw is None:
    sizes = (int(data_config.min_size), max_size, s)
  else:
    sizes = tuple(x * draw.jitter for x in (draw.min_size, max_size, s))
  (nh, nw), (sy, sx) = resize.resize_geometry(*image.shape[:2], *sizes, rule)
  nh, nw = int(nh), int(nw)  # Jittered sizes are floats.

  # 3. The crop of a scale-jittered image into the canvas; boxes that keep less than
  # crop_min_visible of their area inside are dropped.
  jittered = draw is not None and draw.jitter != 1.0
  window = augment.crop_window((nh, nw), canvas, draw.crop) if jittered else (0, 0, nh, nw)
  image = resize.resize_window(image, (nh, nw), window, rule)
  boxes = boxes * np.asarray([sx, sy, sx, sy], np.float32)
  keep = np.ones(len(boxes), bool)
  if not jittered:
    boxes = np.clip(boxes, 0, np.asarray([nw, nh, nw, nh], np.float32))  # Rounding of the sides.
  else:  # Also uncropped: at scale 0.1 the rounding of a side can swallow a whole box.
    boxes, keep = augment.crop_boxes(boxes, is_crowd, window,
                                     float(data_config.get('crop_min_visible', 0.0)))
    boxes, labels, is_crowd = boxes[keep], labels[keep], is_crowd[keep]
  _, _, ch, cw = window
  if ch > canvas[0] or cw > canvas[1]:
    raise ValueError(f'Image id {example["image_id"]}: resized to {ch}x{cw}, larger than the '
                     f'{canvas[0]}x{canvas[1]} canvas.')

  # 4. The flips.
  if flip:
    image, boxes = augment.hflip(image, boxes)
  if draw is not None and draw.vflip:
    image, boxes = augment.vflip(image, boxes)

  # 5. The photometric distortion, of the final pixels.
  if draw is not None and draw.photometric:
    image = augment.photometric(np.ascontiguousarray(image), draw)

  # 6. Padded: the image into the canvas at the top left; the objects to max_boxes, those past
  # it dropped crowd regions first (they only ever cause ignored anchors), then the last ones
  # in file order.
  max_boxes = int(data_config.max_boxes)
  order = np.argsort(is_crowd, kind='stable')[:max_boxes]
  n = len(order)
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_boxes[:n] = boxes[order]
  out_labels = np.zeros((max_boxes,), np.int32)
  out_labels[:n] = labels[order]
  crowd = np.zeros((max_boxes,), bool)
  crowd[:n] = is_crowd[order]
  padded = np.zeros((*canvas, 3), image.dtype) if image_out is None else image_out
  padded[:ch, :cw] = image
  return {
      'image': padded, 'image_hw': np.asarray([ch, cw], np.int32), 'boxes': out_boxes,
      'labels': out_labels, 'is_crowd': crowd, 'box_valid': np.arange(max_boxes) < n,
      'image_id': np.int64(example['image_id']), 'orig_hw': np.asarray(orig_hw, np.int32),
      'scale': np.asarray([sy, sx], np.float32), 'example_valid': np.bool_(True),
      'cropped_out': np.int32((~keep).sum())}


def normalize_images(images: jax.Array, image_hw: jax.Array, mean: Sequence[float],
                     std: Sequence[float]) -> jax.Array:
  """On device: uint8 or float32 [B, S, S, 3] -> float32 [B, S, S, 3], (x - mean) / std, 0
  outside image_hw.

  image_hw: int [B, 2] (h, w) of the valid top-left region. The padding is exactly 0 after
  normalising, as torchvision pads normalised images (a padded 0 pixel would otherwise become
  -mean / std). Jit-able; mean and std may be Python tuples (config.data.pixel_mean/std).
  """
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  ys = jnp.arange(images.shape[1])[None, :, None]
  xs = jnp.arange(images.shape[2])[None, None, :]
  valid = (ys < image_hw[:, 0, None, None]) & (xs < image_hw[:, 1, None, None])
  return jnp.where(valid[..., None], x, 0.0)
