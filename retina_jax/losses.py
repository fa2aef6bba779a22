"""RetinaNet losses: focal loss, box losses, the OHEM baseline, and the combined detection loss.

Everything is computed in float32 whatever the compute dtype of the model, and every sum is over
the whole (global) batch: under `jax.jit` with the batch sharded over devices and hosts, the
foreground count that normalises the loss is the global one, so the loss scale does not depend on
the number of devices.

config.loss.normalizer: 'batch' (the paper, Detectron, detectron2) divides the sums over the batch
by the batch's foreground count; 'per_image' (torchvision) divides each image's sums by its own
foreground count and averages over the images, which weighs an image with few objects as much as
one with many.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from retina_jax import box_coder
from retina_jax import box_ops
from retina_jax import matcher
from retina_jax import postprocess


def focal_loss(logits: jax.Array, targets: jax.Array, alpha: float | jax.Array,
               gamma: float | jax.Array) -> jax.Array:
  """Sigmoid focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), element-wise.

  Computed from log-sigmoid (never log(sigmoid(x))) so that logits of +-100 and bf16 inputs stay
  finite, and (1 - p_t)^gamma as exp(gamma * log(1 - p_t)) so that gradients are finite for every
  gamma >= 0, including fractional ones where (1 - p_t) reaches 0. alpha weighs positives and
  1 - alpha negatives; gamma = 0 and alpha = 0.5 is half the binary cross entropy.

  Args:
    logits: [..., K] class logits, any float dtype.
    targets: [..., K] binary targets (0 or 1; any dtype, nonzero is positive), same shape.
    alpha: weight of the positive class (a Python number or a traced scalar).
    gamma: focusing parameter (a Python number or a traced scalar).

  Returns:
    [..., K] float32 loss per element.
  """
  logits = logits.astype(jnp.float32)
  positive = targets.astype(bool)
  # p_t = sigmoid(z) with z = x for positives and -x for negatives, so log p_t = log_sigmoid(z)
  # and log(1 - p_t) = log_sigmoid(-z) = log p_t - z: one softplus per element instead of two
  # (the loss is a visible share of a CPU train step).
  z = jnp.where(positive, logits, -logits)
  log_p_t = jax.nn.log_sigmoid(z)
  log_not_p_t = log_p_t - z
  alpha_t = jnp.where(positive, alpha, 1.0 - alpha)
  if isinstance(gamma, (int, float)) and gamma == 0:  # Cross entropy: skip the exp.
    return -alpha_t * log_p_t
  return -alpha_t * jnp.exp(gamma * log_not_p_t) * log_p_t


def _focal_parts(logits, labels, alpha, gamma):
  """Per element: the focal loss and its derivative by the logit, float32, from one exp and one
  log1p (plus one exp for a fractional or traced gamma): [..., K] logits, [...] int labels."""
  x = logits.astype(jnp.float32)
  positive = labels[..., None] == jnp.arange(x.shape[-1], dtype=labels.dtype)
  z = jnp.where(positive, x, -x)  # p_t = sigmoid(z)
  e = jnp.exp(-jnp.abs(z))
  r = 1.0 / (1.0 + e)
  p_t = jnp.where(z >= 0, r, e * r)
  q = jnp.where(z >= 0, e * r, r)  # 1 - p_t, without cancellation.
  log_p_t = -jnp.log1p(e) - jnp.maximum(-z, 0.0)
  alpha_t = jnp.where(positive, alpha, 1.0 - alpha)
  static = isinstance(gamma, (int, float))
  if static and gamma == 0:
    weight = jnp.ones_like(q)
  elif static and float(gamma).is_integer():
    weight = q ** int(gamma)
  else:
    # exp(gamma * log(1 - p_t)) stays finite, with a finite derivative, where q underflows to 0:
    # q ** gamma there has an infinite derivative for 0 < gamma < 1, and for a traced gamma of 0
    # its 0 ** 0 would be taken as 1 with a NaN derivative.
    weight = jnp.exp(gamma * (log_p_t - z))
  loss = -alpha_t * weight * log_p_t
  # d/dz [-a (1 - p)^g log p] = a (1 - p)^g (g p log p - (1 - p)), and dz/dx = +-1.
  dz = alpha_t * weight * (gamma * p_t * log_p_t - q)
  return loss, jnp.where(positive, dz, -dz)


def focal_loss_sum(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                   alpha: float | jax.Array, gamma: float | jax.Array) -> jax.Array:
  """sum(weights[..., None] * focal_loss(logits, one_hot(labels))), float32 scalar.

  The classification loss of a train step in one pass over the [B, N, K] logits: no one-hot
  targets in memory, and the gradient computed with the loss (a custom VJP), instead of
  autodiff's chain of element-wise passes over the largest tensor of the step.

  Args:
    logits: [..., K] class logits, any float dtype.
    labels: [...] int, the positive class of each row; any value outside [0, K) (e.g. -1) for
      a row with no positive class (background).
    weights: [...] float weight of each row (0 for ignored anchors); not differentiated.
    alpha, gamma: as `focal_loss`: Python numbers (the step is specialised to them: no exp for
      gamma 0, a product for an integer gamma) or float32 scalars, e.g. a fused sweep's
      per-member values traced under `jax.vmap`; neither is differentiated.
  """
  if isinstance(alpha, (int, float)) and isinstance(gamma, (int, float)):
    return _focal_loss_sum_static(logits, labels, weights, float(alpha), float(gamma))
  return _focal_loss_sum_traced(logits, labels, weights, jnp.asarray(alpha, jnp.float32),
                                jnp.asarray(gamma, jnp.float32))


def _focal_loss_sum_fwd(logits, labels, weights, alpha, gamma):
  loss, grad = _focal_parts(logits, labels, alpha, gamma)
  w = weights.astype(jnp.float32)[..., None]
  return jnp.sum(loss * w), (grad * w).astype(logits.dtype)


def _focal_loss_sum_value(logits, labels, weights, alpha, gamma):
  return _focal_loss_sum_fwd(logits, labels, weights, alpha, gamma)[0]


_focal_loss_sum_static = jax.custom_vjp(_focal_loss_sum_value, nondiff_argnums=(3, 4))
_focal_loss_sum_static.defvjp(
    _focal_loss_sum_fwd, lambda alpha, gamma, grad, g: ((g * grad).astype(grad.dtype), None, None))
_focal_loss_sum_traced = jax.custom_vjp(_focal_loss_sum_value)
_focal_loss_sum_traced.defvjp(
    _focal_loss_sum_fwd, lambda grad, g: ((g * grad).astype(grad.dtype), None, None, None, None))


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Element-wise binary cross entropy from logits, float32: [..., K] -> [..., K]."""
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  return -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Huber-style smooth L1 of a difference, element-wise; beta = 0 is plain L1 (detectron2)."""
  x = jnp.abs(x.astype(jnp.float32))
  if beta == 0.0:
    return x
  return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def box_regression_loss(pred_deltas: jax.Array, target_boxes: jax.Array, anchors: jax.Array,
                        loss_cfg: ml_collections.ConfigDict,
                        coder_cfg: ml_collections.ConfigDict) -> jax.Array:
  """Box loss per anchor, summed over coordinates (the caller masks and normalises).

  Args:
    pred_deltas: [B, N, 4] predicted (dx, dy, dw, dh).
    target_boxes: [B, N, 4] matched ground truth, (x1, y1, x2, y2) padded-image pixels.
    anchors: [N, 4] (x1, y1, x2, y2) padded-image pixels.
    loss_cfg: `config.loss` (box_loss, smooth_l1_beta).
    coder_cfg: `config.box_coder` (weights, clamp).

  Returns:
    [B, N] float32.
  """
  pred_deltas = pred_deltas.astype(jnp.float32)
  if loss_cfg.box_loss == 'giou':
    pred_boxes = box_coder.decode(pred_deltas, anchors[None], coder_cfg.weights, coder_cfg.clamp)
    return 1.0 - box_ops.elementwise_giou(pred_boxes, target_boxes)
  target_deltas = box_coder.encode(target_boxes, anchors[None], coder_cfg.weights)
  beta = loss_cfg.smooth_l1_beta if loss_cfg.box_loss == 'smooth_l1' else 0.0
  if loss_cfg.box_loss not in ('smooth_l1', 'l1'):
    raise ValueError(f'config.loss.box_loss must be smooth_l1, l1 or giou, got '
                     f'{loss_cfg.box_loss!r}')
  return smooth_l1(pred_deltas - target_deltas, beta).sum(-1)


def ohem_selection(anchor_loss: jax.Array, labels_fg: jax.Array, considered: jax.Array,
                   anchors: jax.Array, loss_cfg: ml_collections.ConfigDict,
                   num_candidates: int = 2048) -> jax.Array:
  """Online hard example mining over anchors, per image (the paper's Table 1d baseline).

  The hardest anchors by loss are de-duplicated by NMS on the anchor boxes (IoU
  `ohem_nms_iou`), then the best `ohem_batch_per_image` are kept; with
  `ohem_positive_fraction` > 0 at most that share of them are foreground and the rest is filled
  with background (1:3 is 0.25). NMS over all ~10^5 anchors would be quadratic, so it runs on the
  `num_candidates` hardest anchors only: at most batch * (1 / (1 - fraction)) survivors are needed
  and with NMS 0.7 a few thousand candidates always hold them.

  Args:
    anchor_loss: [B, N] float32 classification loss per anchor (summed over classes).
    labels_fg: [B, N] bool, foreground anchors.
    considered: [B, N] bool, anchors that take part (not ignored).
    anchors: [N, 4] (x1, y1, x2, y2) pixels.
    loss_cfg: `config.loss`.
    num_candidates: hardest anchors fed to NMS.

  Returns:
    [B, N] bool, the selected anchors.
  """
  anchors = jnp.asarray(anchors)
  num_anchors = anchor_loss.shape[1]
  num_candidates = min(num_candidates, num_anchors)
  batch = loss_cfg.ohem_batch_per_image
  fraction = loss_cfg.ohem_positive_fraction

  def per_image(loss, fg, keep_mask):
    score = jnp.where(keep_mask, loss, -1.0)
    top_loss, top_idx = jax.lax.top_k(score, num_candidates)
    cand_valid = top_loss >= 0.0
    # Without a positive quota the first `batch` survivors are all that is used: stop there.
    keep = postprocess.nms(anchors[top_idx], top_loss, cand_valid, loss_cfg.ohem_nms_iou, None,
                           max_output=None if fraction > 0.0 else batch)
    # Survivors are in descending loss order: rank them within the allowed groups.
    cand_fg = fg[top_idx]
    if fraction > 0.0:
      max_pos = int(round(batch * fraction))
      pos_rank = jnp.cumsum(keep & cand_fg) - 1
      take_pos = keep & cand_fg & (pos_rank < max_pos)
      num_pos = take_pos.sum()
      neg_rank = jnp.cumsum(keep & ~cand_fg) - 1
      take = take_pos | (keep & ~cand_fg & (neg_rank < batch - num_pos))
    else:
      rank = jnp.cumsum(keep) - 1
      take = keep & (rank < batch)
    return jnp.zeros((num_anchors,), bool).at[top_idx].set(take)

  return jax.vmap(per_image)(anchor_loss, labels_fg, considered)


# The fields of config.loss that a fused sweep gives each member as a traced number.
TRACED_FIELDS = ('alpha', 'gamma', 'box_weight')


def detection_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                   anchors: jax.Array, config: ml_collections.ConfigDict,
                   hparams: Mapping[str, jax.Array] | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Matches anchors to ground truth on device and returns (total loss, parts).

  Args:
    outputs: 'cls_logits' [B, N, K], 'box_deltas' [B, N, 4] from the model.
    batch: 'boxes' [B, G, 4] (x1, y1, x2, y2) padded-image pixels, 'labels' [B, G] int32,
      'is_crowd' [B, G] bool, 'box_valid' [B, G] bool.
    anchors: [N, 4] (x1, y1, x2, y2) padded-image pixels.
    config: the full config (uses loss, matcher, box_coder).
    hparams: float32 scalars that replace config.loss's fields of the same names (some of
      TRACED_FIELDS), e.g. one fused-sweep member's values under `jax.vmap`.

  Returns:
    Scalar float32 loss and a dict of scalar metrics (cls_loss, box_loss, num_foreground).
  """
  # Named scopes: the parts pod_plan --breakdown counts bytes and FLOPs by.
  with jax.named_scope('matching'):
    matched, state = matcher.match_batch(anchors, batch['boxes'], batch['box_valid'],
                                         batch['is_crowd'], config.matcher)
    matched_labels = jnp.take_along_axis(batch['labels'], matched, axis=1)
    matched_boxes = jnp.take_along_axis(batch['boxes'], matched[..., None], axis=1)
  with jax.named_scope('loss'):
    return _loss_terms(outputs, anchors, matched_labels, matched_boxes, state, config,
                       dict(hparams or {}))


def _loss_terms(outputs, anchors, matched_labels, matched_boxes, state, config, hparams):
  """detection_loss's classification and box terms, from what the matching gave each anchor."""
  loss_cfg = config.loss
  unknown = set(hparams) - set(TRACED_FIELDS)
  if unknown:
    raise ValueError(f'detection_loss takes traced values of {TRACED_FIELDS} only, got '
                     f'{sorted(unknown)}')
  alpha, gamma, box_weight = (hparams.get(k, float(loss_cfg[k])) for k in TRACED_FIELDS)
  cls_logits = outputs['cls_logits']
  num_classes = cls_logits.shape[-1]
  foreground = state == 1
  considered = state >= 0
  num_foreground = foreground.sum()
  # Weight of each anchor's loss [B, 1]: 1 / (foreground count) of the batch or of its image.
  normalizer = loss_cfg.normalizer
  if normalizer == 'batch':
    anchor_weight = jnp.broadcast_to(1.0 / jnp.maximum(num_foreground, 1), (len(foreground), 1))
  elif normalizer == 'per_image':
    per_image = jnp.maximum(foreground.sum(axis=1, keepdims=True), 1)
    anchor_weight = 1.0 / (per_image * foreground.shape[0])
  else:
    raise ValueError(f"config.loss.normalizer must be 'batch' or 'per_image', got {normalizer!r}")
  anchor_weight = anchor_weight.astype(jnp.float32)

  if loss_cfg.kind == 'focal':
    labels = jnp.where(foreground, matched_labels, -1)
    cls_loss = focal_loss_sum(cls_logits, labels, considered * anchor_weight, alpha, gamma)
  elif loss_cfg.kind == 'ohem':
    targets = jax.nn.one_hot(matched_labels, num_classes) * foreground[..., None]
    anchor_loss = sigmoid_cross_entropy(cls_logits, targets).sum(-1)
    selected = ohem_selection(jax.lax.stop_gradient(anchor_loss), foreground, considered,
                              anchors, loss_cfg)
    cls_loss = jnp.sum(anchor_loss * selected) / jnp.maximum(selected.sum(), 1)
  else:
    raise ValueError(f'config.loss.kind must be focal or ohem, got {loss_cfg.kind!r}')

  per_anchor_box = box_regression_loss(outputs['box_deltas'], matched_boxes, anchors, loss_cfg,
                                       config.box_coder)
  box_loss = jnp.sum(jnp.where(foreground, per_anchor_box * anchor_weight, 0.0))
  total = cls_loss + box_weight * box_loss
  return total, {'cls_loss': cls_loss, 'box_loss': box_loss,
                 'num_foreground': num_foreground.astype(jnp.float32)}
