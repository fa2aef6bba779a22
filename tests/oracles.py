"""Plain numpy references, written loop by loop from the definitions, for the geometry tests."""

import numpy as np


def iou(a, b):
  """a: [N, 4], b: [M, 4] xyxy -> [N, M] float32 IoU, 0 where the union is 0."""
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  out = np.zeros((len(a), len(b)), np.float32)
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(min(p[2], q[2]) - max(p[0], q[0]), np.float32(0))
      ih = max(min(p[3], q[3]) - max(p[1], q[1]), np.float32(0))
      inter = np.float32(iw * ih)
      area_p = np.float32(max(p[2] - p[0], 0) * max(p[3] - p[1], 0))
      area_q = np.float32(max(q[2] - q[0], 0) * max(q[3] - q[1], 0))
      union = np.float32(area_p + area_q - inter)
      out[i, j] = inter / union if union > 0 else 0.0
  return out


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
  ious = iou(boxes, boxes)
  kept = []
  for i in order:
    if all(ious[i, j] <= thr or (labels is not None and labels[i] != labels[j]) for j in kept):
      kept.append(i)
  return kept
