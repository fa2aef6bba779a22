"""Anchor-relative box deltas (dx, dy, dw, dh), the R-CNN parameterisation used by RetinaNet.

Formulas are torchvision's BoxCoder (detection/_utils.py) step by step: width = x2 - x1 (no +1),
centre = x1 + 0.5 * width, dx = wx * (gx - ax) / aw, dw = ww * log(gw / aw), and on decoding
dw, dh clamped from above at `clamp` (log(1000 / 16)) before exp. Converted torchvision
regression weights therefore decode to the same boxes.
"""

import math

import jax.numpy as jnp

# Target boxes of zero width or height (padded ground-truth slots that a background anchor
# points at) are encoded with this side instead of 0, so dw/dh stay finite (~ -17 for a 32 px
# anchor) and a masked loss never computes inf * 0. Positive sides are encoded exactly.
_MIN_TARGET_SIDE = 1e-6


def _centre_size(boxes):
  """[..., 4] (x1, y1, x2, y2) -> (centre x, centre y, width, height), each [...].

  Width is x2 - x1 with no +1, as torchvision's BoxCoder, so converted weights decode alike.
  """
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
  """Deltas that turn `anchors` into `boxes`.

  Args:
    boxes: [..., 4] target (x1, y1, x2, y2) pixels.
    anchors: [..., 4] (x1, y1, x2, y2) pixels, broadcastable against `boxes`, positive sides.
    weights: (wx, wy, ww, wh) multipliers, config.box_coder.weights.

  Returns:
    [..., 4] float32 deltas (dx, dy, dw, dh).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  gx, gy, gw, gh = _centre_size(boxes)
  dx = wx * (gx - ax) / aw
  dy = wy * (gy - ay) / ah
  dw = ww * jnp.log(jnp.maximum(gw, _MIN_TARGET_SIDE) / aw)
  dh = wh * jnp.log(jnp.maximum(gh, _MIN_TARGET_SIDE) / ah)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clamp=math.log(1000.0 / 16)):
  """Boxes from anchors and deltas (inverse of `encode`).

  Args:
    deltas: [..., 4] (dx, dy, dw, dh), any float dtype (computed in float32).
    anchors: [..., 4] (x1, y1, x2, y2) pixels, broadcastable against `deltas`.
    weights: (wx, wy, ww, wh), config.box_coder.weights.
    clamp: upper bound on dw / ww and dh / wh before exp, config.box_coder.clamp.

  Returns:
    [..., 4] float32 (x1, y1, x2, y2) pixels, not clipped to the image.
  """
  deltas = jnp.asarray(deltas, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, clamp)
  cx = dx * aw + ax
  cy = dy * ah + ay
  half_w = 0.5 * (jnp.exp(dw) * aw)
  half_h = 0.5 * (jnp.exp(dh) * ah)
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
