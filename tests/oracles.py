"""Plain numpy references, written loop by loop from the definitions, for the geometry tests."""

import numpy as np


def iou(a, b):
  """a: [N, 4], b: [M, 4] xyxy -> [N, M] float32 IoU, 0 where the union is 0."""
  a = np.asarray(a, np.float32)[:, None, :]
  b = np.asarray(b, np.float32)[None, :, :]
  iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
  ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
  inter = iw * ih
  area_a = np.maximum(a[..., 2] - a[..., 0], 0) * np.maximum(a[..., 3] - a[..., 1], 0)
  area_b = np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)
  union = area_a + area_b - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, inter / union, 0).astype(np.float32)


def ioa(a, b):
  """a: [N, 4], b: [M, 4] xyxy -> [N, M] intersection / area(a), 0 where area(a) is 0."""
  out = np.zeros((len(a), len(b)), np.float64)
  for i, p in enumerate(a):
    area_p = max(p[2] - p[0], 0) * max(p[3] - p[1], 0)
    for j, q in enumerate(b):
      iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
      ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
      out[i, j] = iw * ih / area_p if area_p > 0 else 0.0
  return out


def decode(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clamp=np.log(1000.0 / 16)):
  """[..., 4] deltas and anchors -> [..., 4] xyxy boxes, float64."""
  d = np.asarray(deltas, np.float64)
  a = np.asarray(anchors, np.float64)
  aw, ah = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
  ax, ay = a[..., 0] + aw / 2, a[..., 1] + ah / 2
  cx = d[..., 0] / weights[0] * aw + ax
  cy = d[..., 1] / weights[1] * ah + ay
  w = np.exp(np.minimum(d[..., 2] / weights[2], clamp)) * aw
  h = np.exp(np.minimum(d[..., 3] / weights[3], clamp)) * ah
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def greedy_nms(boxes, scores, valid, thr, labels=None):
  """Textbook greedy NMS: indices kept, in processing order (score desc, then index asc)."""
  order = sorted(np.flatnonzero(valid), key=lambda i: (-scores[i], i))
  labels = np.zeros(len(boxes), int) if labels is None else np.asarray(labels)
  kept = []
  for i in order:
    k = np.asarray(kept, int)
    overlaps = iou(np.asarray(boxes)[i:i + 1], np.asarray(boxes)[k])[0] > thr
    if not (overlaps & (labels[k] == labels[i])).any():
      kept.append(i)
  return kept
