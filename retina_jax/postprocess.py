"""Detections from head outputs: per-level top-k, decoding, clipping, class-wise NMS; in jit.

Follows torchvision's RetinaNet.postprocess_detections step by step, with static shapes: every
boolean filter becomes a validity mask and every variable-length list a padded, masked array.
"""

import jax
import jax.numpy as jnp

from retina_jax import box_coder
from retina_jax import box_ops


def _iou_one_to_many(box, boxes):
  """box: [4], boxes: [M, 4] (x1, y1, x2, y2) pixels -> [M] IoU, 0 where the union is 0.

  Same arithmetic as torchvision's NMS kernel (inter / (area_i + area_j - inter)).
  """
  return box_ops.pairwise_iou(box[None, :], boxes)[0]


def _greedy_nms(boxes, scores, valid, iou_threshold, labels, max_output):
  """Greedy NMS that stops after `max_output` selections or when no candidate is left.

  Each step selects the best remaining candidate (argmax of the masked scores; on equal scores
  the lower index, like a stable descending sort) and removes every candidate of the same label
  whose IoU with it is > iou_threshold. Why this scheme: a step costs O(M) (one argmax and one
  IoU row, no [M, M] matrix), and the number of steps is the number of boxes kept, capped by
  `max_output`. Post-processing only needs the best max_detections (100) survivors, and greedy
  NMS finds survivors in descending score order, so at M = 5000 candidates it runs <= 100 cheap
  steps instead of a 5000-step loop or a 5000 x 5000 IoU matrix (100 MB). Tiled schemes (TF's
  non_max_suppression_padded) need the full suppression pass before they can rank the
  survivors, which is more work when only the top 100 are wanted (the times of both:
  benchmarks/RESULTS.md, from benchmarks/postprocess_speed.py).

  Args:
    boxes: [M, 4] (x1, y1, x2, y2) pixels.
    scores: [M] float.
    valid: [M] bool; invalid candidates are never selected and suppress nothing.
    iou_threshold: a candidate is suppressed when its IoU with a selected box is > this.
    labels: [M] int or None; when given only equal labels suppress each other.
    max_output: static int, the most selections made.

  Returns:
    selected: [max_output] int32 candidate indices in selection (= descending score) order,
      0 in unused slots.
    num_selected: int32 scalar, how many slots are used.
  """
  m = boxes.shape[0]
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  labels = None if labels is None else jnp.asarray(labels)

  def cond(carry):
    step, alive, _ = carry
    return (step < max_output) & jnp.any(alive)

  def body(carry):
    step, alive, selected = carry
    best = jnp.argmax(jnp.where(alive, scores, -jnp.inf))
    suppress = _iou_one_to_many(boxes[best], boxes) > iou_threshold
    if labels is not None:
      suppress &= labels == labels[best]
    alive = alive & ~suppress & (jnp.arange(m) != best)
    return step + 1, alive, selected.at[step].set(best.astype(jnp.int32))

  init = (jnp.int32(0), jnp.asarray(valid, bool), jnp.zeros((max_output,), jnp.int32))
  num_selected, _, selected = jax.lax.while_loop(cond, body, init)
  return selected, num_selected


def nms(boxes, scores, valid, iou_threshold, labels=None, max_output=None):
  """Greedy non-maximum suppression with static shapes (see _greedy_nms for the scheme).

  Args:
    boxes: [M, 4] (x1, y1, x2, y2) pixels.
    scores: [M] float.
    valid: [M] bool; invalid candidates are never kept and suppress nothing.
    iou_threshold: suppress when IoU with a kept, higher-scoring box is > this (torchvision).
    labels: [M] int or None. Given: class-wise NMS, boxes of different labels never suppress
      each other (torchvision batched_nms).
    max_output: static int or None. Stop after keeping this many boxes (the best ones, by
      score): the cost is one O(M) step per kept box, so e.g. OHEM's 128 hardest anchors out
      of 100k cost 128 steps. None: run to the end.

  Returns:
    keep: [M] bool.
  """
  m = boxes.shape[0]
  max_output = m if max_output is None else min(int(max_output), m)
  selected, num_selected = _greedy_nms(boxes, scores, valid, iou_threshold, labels, max_output)
  used = jnp.arange(max_output) < num_selected
  # Unused slots scatter out of range and are dropped.
  return jnp.zeros((m,), bool).at[jnp.where(used, selected, m)].set(True, mode='drop')


def _level_candidates(best_scores, logits, deltas, anchors, start, n, hw, post_cfg, coder_cfg):
  """Best (anchor, class) pairs of one level of one image, decoded and clipped.

  The result equals torchvision's "sigmoid, flatten (anchor, class), keep > threshold, top-k"
  with ties ranked by flat index, but is found in two stages, because one top-k over all
  n * K pairs of P3 (12M at 800x1344, K = 80) is the slowest op of post-processing on CPU:
  1. the k best anchors by their best class score (a top-k over n). Every pair of the global
     top-k belongs to one of them: if anchor a were not among them, k other anchors would each
     own a pair ranking ahead of every pair of a.
  2. a top-k over the k * K pairs of those anchors, taken in ascending anchor order so that equal
     scores still rank by flat index (lax.top_k puts the lower index first).
  The level is addressed by offset into the full arrays, never sliced out of them: on CPU a
  slice of the [N, K] logits is a 48 MB copy that costs more than all the rest.

  Args:
    best_scores: [N] sigmoid(max over classes of the logits) of every anchor, all levels.
    logits: [N, K] class logits, all levels.
    deltas: [N, 4] box deltas, all levels.
    anchors: [N, 4] (x1, y1, x2, y2) pixels, all levels.
    start, n: static first anchor and anchor count of the level.
    hw: [2] (height, width) of the valid image region.

  Returns:
    boxes [k, 4] (x1, y1, x2, y2) pixels clipped to hw, scores [k] (0 where invalid), labels [k]
    int32, valid [k] bool, with k = min(pre_nms_topk, n * K), in descending score order.
  """
  num_classes = logits.shape[1]
  k_anchors = min(post_cfg.pre_nms_topk, n)
  _, cand = jax.lax.top_k(best_scores[start:start + n], k_anchors)
  cand = start + jnp.sort(cand)  # [k_anchors] ascending anchor index.
  scores = jax.nn.sigmoid(logits[cand].astype(jnp.float32)).reshape(-1)  # [k_anchors * K]
  k = min(post_cfg.pre_nms_topk, n * num_classes)
  # Scores at or below the threshold go to -1 so they rank after every kept one; torchvision
  # drops them before its top-k, which gives the same set when fewer than k survive.
  keep = scores > post_cfg.score_threshold
  top_scores, top_idx = jax.lax.top_k(jnp.where(keep, scores, -1.0), k)
  valid = top_scores > post_cfg.score_threshold
  anchor_idx = cand[top_idx // num_classes]
  labels = (top_idx % num_classes).astype(jnp.int32)
  boxes = box_coder.decode(deltas[anchor_idx], anchors[anchor_idx],
                           tuple(coder_cfg.weights), coder_cfg.clamp)
  boxes = box_ops.clip_boxes(boxes, hw)
  return boxes, jnp.where(valid, top_scores, 0.0), labels, valid


def postprocess(cls_logits, box_deltas, anchors, level_sizes, image_hw, post_cfg, coder_cfg):
  """Final detections per image (torchvision RetinaNet.postprocess_detections, static shapes).

  Per level: sigmoid scores over (anchor, class) pairs, keep score > score_threshold, the best
  min(pre_nms_topk, pairs) by score, decode, clip to the image (before NMS, as torchvision).
  Then class-wise NMS at nms_iou over all levels together, and the best max_detections by score.

  Args:
    cls_logits: [B, N, K] logits, N anchors in anchor order (levels concatenated).
    box_deltas: [B, N, 4] (dx, dy, dw, dh).
    anchors: [N, 4] (x1, y1, x2, y2) pixels of the padded image.
    level_sizes: static tuple of anchors per level (anchors.anchors_per_level), summing to N.
    image_hw: [B, 2] (height, width) of each image's valid region in padded-image pixels.
    post_cfg: config.postprocess (score_threshold, pre_nms_topk, nms_iou, max_detections).
    coder_cfg: config.box_coder (weights, clamp).

  Returns:
    dict, D = max_detections, sorted by score descending, padding at the end:
      boxes: [B, D, 4] float32 (x1, y1, x2, y2) padded-image pixels clipped to image_hw
        (0 on padding).
      scores: [B, D] float32 (0 on padding).
      labels: [B, D] int32 contiguous 0..K-1 (0 on padding).
      valid: [B, D] bool.
  """
  level_sizes = tuple(int(n) for n in level_sizes)
  if sum(level_sizes) != anchors.shape[0] or cls_logits.shape[1] != anchors.shape[0]:
    raise ValueError(f'level_sizes {level_sizes} (sum {sum(level_sizes)}), anchors '
                     f'{anchors.shape} and cls_logits {cls_logits.shape} disagree on N.')
  anchors = jnp.asarray(anchors, jnp.float32)
  max_det = post_cfg.max_detections

  def one_image(logits, deltas, hw):
    # sigmoid(max logit) = max sigmoid score, sigmoid being monotone: N sigmoids, not N * K.
    best_scores = jax.nn.sigmoid(jnp.max(logits, axis=1).astype(jnp.float32))  # [N]
    parts = []
    start = 0
    for n in level_sizes:
      parts.append(_level_candidates(best_scores, logits, deltas, anchors, start, n, hw,
                                     post_cfg, coder_cfg))
      start += n
    boxes, scores, labels, valid = (jnp.concatenate(p, axis=0) for p in zip(*parts))
    selected, num_selected = _greedy_nms(boxes, scores, valid, post_cfg.nms_iou, labels,
                                         min(max_det, boxes.shape[0]))
    used = jnp.arange(selected.shape[0]) < num_selected
    out = dict(
        boxes=jnp.where(used[:, None], boxes[selected], 0.0),
        scores=jnp.where(used, scores[selected], 0.0),
        labels=jnp.where(used, labels[selected], 0),
        valid=used,
    )
    pad = max_det - selected.shape[0]  # Only when there are fewer candidates than D.
    if pad:
      out = {k: jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in out.items()}
    return out

  return jax.vmap(one_image)(cls_logits, box_deltas, jnp.asarray(image_hw))
