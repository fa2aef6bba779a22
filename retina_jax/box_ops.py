"""Box geometry on (x1, y1, x2, y2) float32 pixel boxes; pure jnp, jit- and vmap-friendly.

Every ratio here (IoU, IoA, GIoU) is defined as 0 where its denominator is 0 (zero-area boxes,
padded all-zero ground-truth slots), so that masks downstream never meet a NaN.
"""

import jax.numpy as jnp


def area(boxes):
  """Areas of boxes.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2) pixels. Inverted boxes (x2 < x1) count as empty.

  Returns:
    [...] float areas, >= 0.
  """
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def _pairwise_intersection(a, b):
  """a: [N, 4], b: [M, 4] (x1, y1, x2, y2) pixels -> [N, M] intersection areas."""
  # Width and height each from their own two coordinates, never an [N, M, 2] stack: XLA then
  # fuses the whole IoU into the reductions that consume it and writes nothing [N, M] to memory
  # (the stack was the matcher's largest TPU kernel, see benchmarks/RESULTS.md). Same arithmetic
  # as torchvision's box_iou.
  side = lambda lo, hi: jnp.maximum(jnp.minimum(a[:, None, hi], b[None, :, hi])
                                    - jnp.maximum(a[:, None, lo], b[None, :, lo]), 0.0)
  return side(0, 2) * side(1, 3)


def _safe_divide(num, den):
  """num / den where den > 0, else 0 (no NaN in values or gradients)."""
  pos = den > 0
  return jnp.where(pos, num / jnp.where(pos, den, 1.0), 0.0)


def pairwise_iou(a, b):
  """Intersection over union of every box of `a` with every box of `b`.

  Same arithmetic as torchvision.ops.box_iou (inter / (area_a + area_b - inter)), so equal inputs
  give equal values, which matters for ties in the matcher.

  Args:
    a: [N, 4] (x1, y1, x2, y2) pixels.
    b: [M, 4] (x1, y1, x2, y2) pixels.

  Returns:
    [N, M] IoU in [0, 1]; 0 where the union is 0.
  """
  inter = _pairwise_intersection(a, b)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return _safe_divide(inter, union)


def pairwise_ioa(a, b):
  """Intersection over the area of `a`: the fraction of each box of `a` inside each box of `b`.

  Used for anchors (`a`) covered by crowd boxes (`b`).

  Args:
    a: [N, 4] (x1, y1, x2, y2) pixels.
    b: [M, 4] (x1, y1, x2, y2) pixels.

  Returns:
    [N, M] IoA in [0, 1]; 0 where the box of `a` has zero area.
  """
  inter = _pairwise_intersection(a, b)
  return _safe_divide(inter, jnp.broadcast_to(area(a)[:, None], inter.shape))


def elementwise_giou(a, b):
  """Generalized IoU (Rezatofighi et al. 2019) of matching pairs of boxes.

  GIoU = IoU - (enclosing area - union) / enclosing area, in [-1, 1]. The terms whose
  denominator is 0 count as 0, so two identical degenerate boxes give 0, not NaN.

  Args:
    a: [..., 4] (x1, y1, x2, y2) pixels.
    b: [..., 4] (x1, y1, x2, y2) pixels, broadcastable against `a`.

  Returns:
    [...] GIoU per pair.
  """
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  iou = _safe_divide(inter, union)
  enc_lt = jnp.minimum(a[..., :2], b[..., :2])
  enc_rb = jnp.maximum(a[..., 2:], b[..., 2:])
  enc_wh = jnp.maximum(enc_rb - enc_lt, 0.0)
  enclosing = enc_wh[..., 0] * enc_wh[..., 1]
  return iou - _safe_divide(enclosing - union, enclosing)


def clip_boxes(boxes, hw):
  """Clips boxes to their image: x into [0, w], y into [0, h] (torchvision clip_boxes_to_image).

  Args:
    boxes: [..., N, 4] (x1, y1, x2, y2) pixels.
    hw: [..., 2] (height, width) of each image, leading dims matching `boxes`'s.

  Returns:
    [..., N, 4] clipped boxes, same dtype as `boxes`.
  """
  hw = jnp.asarray(hw, boxes.dtype)
  h = hw[..., None, 0]
  w = hw[..., None, 1]
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)
