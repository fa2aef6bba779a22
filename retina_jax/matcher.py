"""IoU matching of anchors to ground truth, on device, static shapes (padded ground truth).

States: 1 foreground (classification target = the matched box's label, box loss on),
0 background (all classes negative), -1 ignore (no loss at all).
"""

import jax
import jax.numpy as jnp

from retina_jax import box_ops

FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1


def match(anchors, gt_boxes, gt_valid, gt_crowd, matcher_cfg):
  """Assigns every anchor a ground-truth box and a state.

  Rules, in order:
  1. IoU is computed against valid, non-crowd ground truth only; padded slots (gt_valid False)
     and crowd boxes can never be matched (their IoU column is -1).
  2. best IoU >= foreground_iou: foreground; < background_iou: background; between: ignore.
  3. allow_low_quality: each valid non-crowd box whose best IoU over all anchors is > 0 also
     makes foreground every anchor reaching exactly that IoU (ties all claimed, as torchvision
     and detectron2 do). Such an anchor keeps its own argmax box as matched_gt, which can be a
     different box when the anchor overlaps another box more (torchvision behaviour; detectron2
     does the same).
  4. Crowd: an anchor that is not foreground and lies more than crowd_ioa inside any valid crowd
     box (intersection / anchor area, IoA) becomes ignore. IoA rather than IoU because a crowd
     box is usually much larger than the anchors inside it: their IoU is tiny even when the
     anchor sits wholly on the crowd, which would make them confident negatives on what are in
     fact unlabelled people (Detectron's crowd filter uses IoA for the same reason). Foreground
     stays foreground: a labelled object inside a crowd region is still a real positive, and
     dropping it would lose exactly the objects the annotators took care to box.
  With no valid non-crowd box every anchor is background (crowd still makes ignores).

  Args:
    anchors: [N, 4] (x1, y1, x2, y2) pixels.
    gt_boxes: [G, 4] (x1, y1, x2, y2) pixels, padded.
    gt_valid: [G] bool, False on padded slots.
    gt_crowd: [G] bool, COCO iscrowd.
    matcher_cfg: config.matcher (foreground_iou, background_iou, allow_low_quality, crowd_ioa).

  Returns:
    matched_gt: [N] int32 index into the G slots: the argmax-IoU valid non-crowd box (0 when
      there is none). Only meaningful where state == 1.
    state: [N] int32 in {1, 0, -1}.
  """
  n = anchors.shape[0]
  if gt_boxes.shape[0] == 0:
    return jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  normal = gt_valid & ~gt_crowd  # [G]
  crowd = gt_valid & gt_crowd  # [G]

  iou = jnp.where(normal[None, :], box_ops.pairwise_iou(anchors, gt_boxes), -1.0)  # [N, G]
  best_iou = jnp.max(iou, axis=1)  # [N]
  matched_gt = jnp.argmax(iou, axis=1).astype(jnp.int32)
  state = jnp.where(best_iou >= matcher_cfg.foreground_iou, FOREGROUND,
                    jnp.where(best_iou < matcher_cfg.background_iou, BACKGROUND, IGNORE))

  if matcher_cfg.allow_low_quality:
    gt_best = jnp.max(iou, axis=0)  # [G]; -1 on invalid and crowd columns.
    claims = (iou == gt_best[None, :]) & (gt_best > 0)[None, :]  # [N, G]
    state = jnp.where(jnp.any(claims, axis=1), FOREGROUND, state)

  ioa = jnp.where(crowd[None, :], box_ops.pairwise_ioa(anchors, gt_boxes), 0.0)  # [N, G]
  in_crowd = jnp.max(ioa, axis=1) > matcher_cfg.crowd_ioa
  state = jnp.where(in_crowd & (state != FOREGROUND), IGNORE, state)
  return matched_gt, state.astype(jnp.int32)


def match_batch(anchors, gt_boxes, gt_valid, gt_crowd, matcher_cfg):
  """`match` over a batch.

  Args:
    anchors: [N, 4] (x1, y1, x2, y2) pixels, shared by the batch.
    gt_boxes: [B, G, 4] (x1, y1, x2, y2) pixels.
    gt_valid: [B, G] bool.
    gt_crowd: [B, G] bool.
    matcher_cfg: config.matcher.

  Returns:
    matched_gt: [B, N] int32; state: [B, N] int32 (1 fg, 0 bg, -1 ignore).
  """
  return jax.vmap(lambda b, v, c: match(anchors, b, v, c, matcher_cfg))(
      gt_boxes, gt_valid, gt_crowd)
