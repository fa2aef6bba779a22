"""Focal loss against the textbook formula, box losses, OHEM selection and the detection loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import box_coder
from retina_jax import config as config_lib
from retina_jax import losses
from retina_jax import matcher

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)


def _log_sigmoid64(x):
  x = np.asarray(x, np.float64)
  return -np.logaddexp(0.0, -x)


def _focal_oracle(x, t, alpha, gamma):
  """Textbook FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), float64."""
  log_p, log_not_p = _log_sigmoid64(x), _log_sigmoid64(-x)
  p, not_p = np.exp(log_p), np.exp(log_not_p)
  p_t = np.where(t == 1, p, not_p)
  log_p_t = np.where(t == 1, log_p, log_not_p)
  alpha_t = np.where(t == 1, alpha, 1 - alpha)
  return -alpha_t * (1 - p_t) ** gamma * log_p_t


def _focal_grad_oracle(x, t, alpha, gamma):
  """d FL / d logit, derived by hand, float64."""
  log_p, log_not_p = _log_sigmoid64(x), _log_sigmoid64(-x)
  p, not_p = np.exp(log_p), np.exp(log_not_p)
  pos = alpha * not_p ** gamma * (gamma * p * log_p - not_p)
  neg = (1 - alpha) * p ** gamma * (p - gamma * not_p * log_not_p)
  return np.where(t == 1, pos, neg)


@pytest.mark.parametrize('gamma', GAMMAS)
@pytest.mark.parametrize('alpha', (0.25, 0.75))
def test_focal_loss_equals_textbook_formula(gamma, alpha):
  rng = np.random.default_rng(0)
  x = rng.uniform(-12, 12, size=(64, 7)).astype(np.float32)
  t = (rng.uniform(size=x.shape) < 0.3).astype(np.float32)
  ours = np.asarray(losses.focal_loss(x, t, alpha, gamma))
  np.testing.assert_allclose(ours, _focal_oracle(x, t, alpha, gamma), rtol=2e-5, atol=1e-7)


def test_gamma_zero_alpha_half_is_half_binary_cross_entropy():
  rng = np.random.default_rng(1)
  x = rng.normal(scale=4, size=(100, 5)).astype(np.float32)
  t = (rng.uniform(size=x.shape) < 0.5).astype(np.float32)
  bce = -(t * _log_sigmoid64(x) + (1 - t) * _log_sigmoid64(-x))
  np.testing.assert_allclose(np.asarray(losses.focal_loss(x, t, 0.5, 0.0)), 0.5 * bce,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(losses.sigmoid_cross_entropy(x, t)), bce, rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('gamma', GAMMAS)
def test_focal_loss_finite_with_exact_gradients_at_extreme_logits(gamma):
  x = np.array([-100, -30, -5, -1e-3, 0, 1e-3, 5, 30, 100] * 2, np.float32)
  t = np.array([1] * 9 + [0] * 9, np.float32)
  loss = losses.focal_loss(x, t, 0.25, gamma)
  grad = jax.grad(lambda v: losses.focal_loss(v, t, 0.25, gamma).sum())(jnp.asarray(x))
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  # rtol 1e-4: XLA's vectorised log1p/exp carry ~1e-5 relative error far in the tails (1e-20).
  np.testing.assert_allclose(np.asarray(loss), _focal_oracle(x, t, 0.25, gamma), rtol=1e-4,
                             atol=1e-30)
  np.testing.assert_allclose(np.asarray(grad), _focal_grad_oracle(x, t, 0.25, gamma), rtol=1e-4,
                             atol=1e-30)
  # A confidently wrong logit of 100 costs about 100 nats, not inf.
  assert float(loss[9 + 8]) == pytest.approx(0.75 * 100, rel=1e-4)


@pytest.mark.parametrize('gamma', GAMMAS)
def test_focal_loss_bf16_inputs_computed_in_float32(gamma):
  rng = np.random.default_rng(2)
  x16 = jnp.asarray(rng.normal(scale=30, size=(50, 3)), jnp.bfloat16)
  t = (rng.uniform(size=(50, 3)) < 0.5).astype(np.float32)
  loss = losses.focal_loss(x16, t, 0.25, gamma)
  grad = jax.grad(lambda v: losses.focal_loss(v, t, 0.25, gamma).sum())(x16)
  assert loss.dtype == jnp.float32
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
  # Same numbers as float32 inputs; atol covers losses below 1e-12 that no sum would notice.
  np.testing.assert_allclose(np.asarray(loss),
                             _focal_oracle(np.asarray(x16, np.float32), t, 0.25, gamma),
                             rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize('gamma', GAMMAS)
@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16))
def test_focal_loss_sum_and_its_gradient_equal_the_oracle(gamma, dtype):
  """The train step's fused loss: value and hand-written VJP against the float64 oracle, with
  background rows (label -1), ignored rows (weight 0), logits of +-100 and bf16 inputs."""
  rng = np.random.default_rng(4)
  x = rng.normal(scale=6, size=(3, 40, 5))
  x[0, :9, 0] = [-100, -30, -5, -1e-3, 0, 1e-3, 5, 30, 100]
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # The values the loss sees.
  labels = rng.integers(-1, 5, size=(3, 40)).astype(np.int32)
  labels[0, :9] = 0
  weights = (rng.uniform(size=(3, 40)) < 0.8).astype(np.float32)
  t = np.eye(5)[np.maximum(labels, 0)] * (labels >= 0)[..., None]
  value, grad = jax.value_and_grad(losses.focal_loss_sum)(jnp.asarray(x, dtype), labels,
                                                         weights, 0.25, gamma)
  assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
  want = (_focal_oracle(x, t, 0.25, gamma) * weights[..., None]).sum()
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  want_grad = _focal_grad_oracle(x, t, 0.25, gamma) * weights[..., None]
  tol = dict(rtol=1e-4, atol=1e-30) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-30)
  np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, **tol)
  # Scaling the loss scales the gradient (the VJP uses its cotangent).
  grad3 = jax.grad(lambda v: 3 * losses.focal_loss_sum(v, labels, weights, 0.25, gamma))(
      jnp.asarray(x, dtype))
  np.testing.assert_allclose(np.asarray(grad3, np.float32), 3 * np.asarray(grad, np.float32),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_smooth_l1_and_l1():
  d = np.array([-1.0, -0.05, 0.0, 0.05, 0.11, 2.0], np.float32)
  beta = 0.11
  expected = np.where(np.abs(d) < beta, 0.5 * d ** 2 / beta, np.abs(d) - 0.5 * beta)
  np.testing.assert_allclose(np.asarray(losses.smooth_l1(d, beta)), expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.smooth_l1(d, 0.0)), np.abs(d))


def _toy_problem(seed=0, batch=2, num_gt=4):
  """Anchors on a 4x4 grid of 3 sizes and random ground truth, in pixels of a 64x64 image."""
  rng = np.random.default_rng(seed)
  centres = (np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) + 0.5) * 16
  anchors = np.concatenate([np.concatenate([centres - s / 2, centres + s / 2], -1)
                            for s in (12, 20, 32)]).astype(np.float32)
  xy = rng.uniform(0, 40, size=(batch, num_gt, 2))
  wh = rng.uniform(8, 30, size=(batch, num_gt, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  batch_dict = {
      'boxes': boxes,
      'labels': rng.integers(0, 3, size=(batch, num_gt)).astype(np.int32),
      'is_crowd': np.zeros((batch, num_gt), bool),
      'box_valid': np.ones((batch, num_gt), bool),
  }
  batch_dict['box_valid'][1, 2:] = False
  return anchors, batch_dict


def test_detection_loss_matches_numpy_reference():
  """Focal + smooth L1 from the matcher's assignment, normalised by all foreground anchors."""
  config = config_lib.get_base_config()
  anchors, batch = _toy_problem()
  n, k = anchors.shape[0], 3
  rng = np.random.default_rng(3)
  outputs = {'cls_logits': rng.normal(size=(2, n, k)).astype(np.float32),
             'box_deltas': rng.normal(scale=0.2, size=(2, n, 4)).astype(np.float32)}
  total, parts = losses.detection_loss(outputs, batch, anchors, config)

  matched, state = matcher.match_batch(jnp.asarray(anchors), batch['boxes'], batch['box_valid'],
                                       batch['is_crowd'], config.matcher)
  matched, state = np.asarray(matched), np.asarray(state)
  fg = state == 1
  assert fg.sum() > 0 and (state == -1).sum() > 0, 'the toy case should exercise every state'
  labels = np.take_along_axis(batch['labels'], matched, 1)
  targets = np.eye(k)[labels] * fg[..., None]
  cls = (_focal_oracle(outputs['cls_logits'], targets, 0.25, 2.0) * (state >= 0)[..., None]).sum()
  gt = np.take_along_axis(batch['boxes'], matched[..., None], 1)
  target_deltas = np.asarray(box_coder.encode(gt, anchors[None], config.box_coder.weights))
  diff = np.abs(outputs['box_deltas'] - target_deltas)
  beta = config.loss.smooth_l1_beta
  box = (np.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).sum(-1) * fg).sum()
  np.testing.assert_allclose(float(parts['cls_loss']), cls / fg.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(parts['box_loss']), box / fg.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(total), (cls + box) / fg.sum(), rtol=1e-5)
  assert float(parts['num_foreground']) == fg.sum()


def test_detection_loss_normaliser_is_global_under_sharding():
  """Sharding the batch over 4 devices must not change the loss (normaliser over all devices)."""
  config = config_lib.get_base_config()
  anchors, batch = _toy_problem(seed=5, batch=4)
  batch['box_valid'][0] = False  # One image with no objects: per-device normalisers would differ.
  rng = np.random.default_rng(4)
  n = anchors.shape[0]
  outputs = {'cls_logits': rng.normal(size=(4, n, 3)).astype(np.float32),
             'box_deltas': rng.normal(scale=0.2, size=(4, n, 4)).astype(np.float32)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('data',))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  fn = jax.jit(lambda o, b: losses.detection_loss(o, b, anchors, config)[0])
  sharded = fn(jax.device_put(outputs, shard), jax.device_put(batch, shard))
  single = losses.detection_loss(outputs, batch, anchors, config)[0]
  np.testing.assert_allclose(float(sharded), float(single), rtol=1e-6)


@pytest.mark.parametrize('box_loss', ['l1', 'giou'])
def test_box_loss_options_are_zero_at_the_target(box_loss):
  config = config_lib.get_base_config()
  config.loss.box_loss = box_loss
  anchors, batch = _toy_problem()
  matched, _ = matcher.match_batch(jnp.asarray(anchors), batch['boxes'], batch['box_valid'],
                                   batch['is_crowd'], config.matcher)
  gt = np.take_along_axis(batch['boxes'], np.asarray(matched)[..., None], 1)
  perfect = box_coder.encode(gt, anchors[None], config.box_coder.weights)
  per_anchor = losses.box_regression_loss(perfect, gt, anchors, config.loss, config.box_coder)
  np.testing.assert_allclose(np.asarray(per_anchor), 0.0, atol=1e-5)
  worse = losses.box_regression_loss(perfect + 0.3, gt, anchors, config.loss, config.box_coder)
  assert np.all(np.asarray(worse) > 1e-3)


def _ohem_oracle(loss, fg, considered, anchors, batch, nms_iou, fraction, num_candidates):
  """Greedy numpy OHEM for one image."""
  score = np.where(considered, loss, -1.0)
  order = np.argsort(-score, kind='stable')[:num_candidates]
  kept = []
  for i in order:
    if score[i] < 0:
      break
    box = anchors[i]
    ok = True
    for j in kept:
      other = anchors[j]
      iw = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
      ih = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
      inter = iw * ih
      union = ((box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) *
               (other[3] - other[1]) - inter)
      if inter / union > nms_iou:
        ok = False
        break
    if ok:
      kept.append(i)
  if fraction > 0:
    pos = [i for i in kept if fg[i]][:int(round(batch * fraction))]
    neg = [i for i in kept if not fg[i]][:batch - len(pos)]
    chosen = pos + neg
  else:
    chosen = kept[:batch]
  out = np.zeros(loss.shape, bool)
  out[chosen] = True
  return out


@pytest.mark.parametrize('fraction', [0.0, 0.25])
def test_ohem_selects_hardest_anchors_after_nms(fraction):
  config = config_lib.get_base_config()
  config.loss.ohem_batch_per_image = 8
  config.loss.ohem_nms_iou = 0.5
  config.loss.ohem_positive_fraction = fraction
  anchors, _ = _toy_problem()
  rng = np.random.default_rng(6)
  n = anchors.shape[0]
  loss = rng.uniform(size=(2, n)).astype(np.float32)
  fg = rng.uniform(size=(2, n)) < 0.2
  considered = rng.uniform(size=(2, n)) < 0.9
  selected = np.asarray(losses.ohem_selection(loss, fg, considered, anchors, config.loss,
                                              num_candidates=32))
  for b in range(2):
    expected = _ohem_oracle(loss[b], fg[b], considered[b], anchors, 8, 0.5, fraction, 32)
    np.testing.assert_array_equal(selected[b], expected)
  assert selected.sum(1).max() <= 8


def test_ohem_loss_is_finite_and_differs_from_focal():
  config = config_lib.get_base_config()
  anchors, batch = _toy_problem()
  rng = np.random.default_rng(7)
  n = anchors.shape[0]
  outputs = {'cls_logits': rng.normal(size=(2, n, 3)).astype(np.float32),
             'box_deltas': np.zeros((2, n, 4), np.float32)}
  focal = float(losses.detection_loss(outputs, batch, anchors, config)[1]['cls_loss'])
  config.loss.kind = 'ohem'
  ohem = float(losses.detection_loss(outputs, batch, anchors, config)[1]['cls_loss'])
  assert np.isfinite(ohem) and ohem != pytest.approx(focal)


TRACED_GAMMAS = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)


def test_focal_loss_with_traced_gamma_and_alpha_is_finite_and_exact():
  """Under vmap over members (a fused sweep) gamma and alpha are traced: no specialisation on
  their values, yet loss and gradient equal the oracle, also for gamma 0 and 0 < gamma < 1 at
  logits where 1 - p_t underflows to 0 in float32 (|x| of 100 and 200)."""
  x = np.array([-200, -100, -30, -5, -1e-3, 0, 1e-3, 5, 30, 100, 200] * 2, np.float32)
  t = np.array([1] * 11 + [0] * 11, np.float32)
  labels = np.where(t == 1, 0, -1).astype(np.int32)[:, None]  # One class per row.
  gammas = np.array(TRACED_GAMMAS, np.float32)
  alphas = np.linspace(0.1, 0.9, len(gammas)).astype(np.float32)

  def per_member(a, g):
    elementwise = jax.value_and_grad(lambda v: losses.focal_loss(v, t, a, g).sum())
    summed = jax.value_and_grad(
        lambda v: losses.focal_loss_sum(v[:, None, None], labels, jnp.ones((len(x), 1)), a, g))
    return elementwise(jnp.asarray(x)), summed(jnp.asarray(x))

  (loss_e, grad_e), (loss_s, grad_s) = jax.jit(jax.vmap(per_member))(alphas, gammas)
  for m, (a, g) in enumerate(zip(alphas, gammas)):
    want = _focal_oracle(x, t, float(a), float(g))
    want_grad = _focal_grad_oracle(x, t, float(a), float(g))
    for loss, grad in ((loss_e[m], grad_e[m]), (loss_s[m], grad_s[m])):
      assert np.all(np.isfinite(grad)), (g, grad)
      np.testing.assert_allclose(float(loss), want.sum(), rtol=1e-5)
      np.testing.assert_allclose(np.asarray(grad).ravel(), want_grad, rtol=1e-4, atol=1e-30)


def test_detection_loss_with_traced_hparams_equals_the_configs():
  """A fused sweep's per-member alpha, gamma and box weight, traced under vmap, give each member
  the loss and gradient its own config gives."""
  anchors, batch = _toy_problem(seed=2)
  rng = np.random.default_rng(6)
  n = anchors.shape[0]
  outputs = {'cls_logits': rng.normal(size=(2, n, 3)).astype(np.float32),
             'box_deltas': rng.normal(scale=0.2, size=(2, n, 4)).astype(np.float32)}
  members = [(0.0, 0.75, 1.0), (0.5, 0.5, 2.0), (2.0, 0.25, 0.5)]
  hparams = {k: jnp.asarray([m[i] for m in members], jnp.float32)
             for i, k in enumerate(('gamma', 'alpha', 'box_weight'))}
  base = config_lib.get_base_config()
  fused = jax.jit(jax.vmap(jax.value_and_grad(
      lambda o, h: losses.detection_loss(o, batch, anchors, base, h)[0]), in_axes=(None, 0)))
  values, grads = fused(outputs, hparams)
  for m, (gamma, alpha, box_weight) in enumerate(members):
    config = config_lib.get_base_config()
    config.loss.gamma, config.loss.alpha, config.loss.box_weight = gamma, alpha, box_weight
    value, grad = jax.value_and_grad(
        lambda o: losses.detection_loss(o, batch, anchors, config)[0])(outputs)
    np.testing.assert_allclose(float(values[m]), float(value), rtol=1e-6)
    for k in grad:
      np.testing.assert_allclose(np.asarray(grads[k][m]), np.asarray(grad[k]), rtol=1e-5,
                                 atol=1e-9)
  with pytest.raises(ValueError, match='smooth_l1_beta'):
    losses.detection_loss(outputs, batch, anchors, base, {'smooth_l1_beta': 0.1})
