import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from retina_jax import config as config_lib
from retina_jax import matcher
from tests import oracles


def _cfg(**overrides):
  cfg = config_lib.get_base_config().matcher
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def oracle_match(anchors, gt, valid, crowd, cfg):
  """The rules of matcher.match, anchor by anchor."""
  iou = oracles.iou(anchors, gt)
  ioa = oracles.ioa(anchors, gt)
  normal = [j for j in range(len(gt)) if valid[j] and not crowd[j]]
  gt_best = {j: max(iou[:, j]) for j in normal}
  matched = np.zeros(len(anchors), np.int32)
  state = np.zeros(len(anchors), np.int32)
  for i in range(len(anchors)):
    best, best_j = -1.0, 0
    for j in normal:
      if iou[i, j] > best:
        best, best_j = iou[i, j], j
    matched[i] = best_j
    if best >= cfg.foreground_iou:
      state[i] = 1
    elif best >= cfg.background_iou:
      state[i] = -1
    if cfg.allow_low_quality and any(gt_best[j] > 0 and iou[i, j] == gt_best[j] for j in normal):
      state[i] = 1
    covered = any(valid[j] and crowd[j] and ioa[i, j] > cfg.crowd_ioa for j in range(len(gt)))
    if covered and state[i] != 1:
      state[i] = -1
  return matched, state


def _int_boxes(rng, n, size=64, max_side=40):
  # Integer corners: every IoU is an exact quotient of integers, so ties are real ties.
  xy = rng.integers(0, size, (n, 2))
  wh = rng.integers(1, max_side, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _case(rng, kind):
  anchors = _int_boxes(rng, 60)
  anchors[:20] = anchors[rng.integers(20, 60, 20)]  # Duplicate anchors: tied IoUs.
  g = 6
  gt = _int_boxes(rng, g)
  valid = rng.random(g) < 0.8
  crowd = rng.random(g) < 0.25
  if kind == 'empty':
    valid[:] = False
  elif kind == 'all_crowd':
    valid[:] = True
    crowd[:] = True
  elif kind == 'zero_area':
    gt[:2, 3] = gt[:2, 1]
    valid[:2] = True
    crowd[:2] = False
  elif kind == 'ties':
    gt[1] = gt[0]  # Two identical ground-truth boxes.
    valid[:2] = True
    crowd[:2] = False
  gt[~valid] = 0  # What the input pipeline puts in padded slots.
  return anchors, gt, valid, crowd


KINDS = ['random', 'empty', 'all_crowd', 'zero_area', 'ties']


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('low_quality', [True, False])
def test_matches_numpy_oracle(kind, low_quality):
  cfg = _cfg(allow_low_quality=low_quality)
  fn = jax.jit(lambda *a: matcher.match(*a, cfg))
  rng = np.random.default_rng([KINDS.index(kind), int(low_quality)])
  for _ in range(5):
    anchors, gt, valid, crowd = _case(rng, kind)
    matched, state = (np.asarray(x) for x in fn(anchors, gt, valid, crowd))
    want_matched, want_state = oracle_match(anchors, gt, valid, crowd, cfg)
    np.testing.assert_array_equal(state, want_state)
    fg = state == 1
    np.testing.assert_array_equal(matched[fg], want_matched[fg])
    assert matched.dtype == np.int32 and state.dtype == np.int32
    if kind == 'empty':
      assert (state == 0).all()
    if kind == 'all_crowd':
      assert not fg.any()


def test_crowd_and_padding_rules():
  anchors = np.array([[0, 0, 10, 10],     # inside the crowd box only -> ignore
                      [50, 50, 60, 60],   # on the real box and inside the crowd -> foreground
                      [200, 200, 210, 210]], np.float32)  # nowhere -> background
  gt = np.array([[50, 50, 60, 60], [0, 0, 100, 100], [200, 200, 210, 210]], np.float32)
  valid = np.array([True, True, False])  # The third slot is padding: it must not match.
  crowd = np.array([False, True, False])
  matched, state = matcher.match(anchors, gt, valid, crowd, _cfg())
  np.testing.assert_array_equal(state, [-1, 1, 0])
  assert int(matched[1]) == 0


def test_low_quality_keeps_the_anchors_own_argmax():
  # Anchor 0 overlaps box 1 best (IoU 0.45: ignore by threshold) and is box 0's best anchor
  # (IoU 0.25): low-quality matching makes it foreground, still matched to box 1 (torchvision).
  anchors = np.array([[0, 0, 20, 10], [100, 100, 110, 110]], np.float32)
  gt = np.array([[0, 0, 10, 5], [0, 0, 9, 10]], np.float32)
  valid = np.array([True, True])
  crowd = np.array([False, False])
  matched, state = matcher.match(anchors, gt, valid, crowd, _cfg())
  np.testing.assert_array_equal(state, [1, 0])
  assert int(matched[0]) == 1
  _, state = matcher.match(anchors, gt, valid, crowd, _cfg(allow_low_quality=False))
  np.testing.assert_array_equal(state, [-1, 0])


def test_equals_torchvision_matcher_without_crowd():
  rng = np.random.default_rng(7)
  cfg = _cfg()
  tv = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  fn = jax.jit(lambda *a: matcher.match(*a, cfg))
  for _ in range(20):
    anchors = _int_boxes(rng, 80)
    anchors[:20] = anchors[rng.integers(20, 80, 20)]
    gt = _int_boxes(rng, 5)
    valid = np.ones(5, bool)
    crowd = np.zeros(5, bool)
    iou = oracles.iou(gt, anchors)
    if (iou.max(1) == 0).any():
      continue  # torchvision lets a box with no overlap claim every anchor; we do not.
    want = tv(torch.from_numpy(iou)).numpy()
    matched, state = (np.asarray(x) for x in fn(anchors, gt, valid, crowd))
    np.testing.assert_array_equal(state, np.select([want >= 0, want == -2], [1, -1], 0))
    np.testing.assert_array_equal(matched[want >= 0], want[want >= 0])


def test_match_batch_is_match_per_image():
  rng = np.random.default_rng(3)
  anchors = _int_boxes(rng, 40)
  cases = [_case(rng, 'random')[1:] for _ in range(3)]
  gt, valid, crowd = (np.stack(x) for x in zip(*cases))
  matched, state = jax.jit(lambda *a: matcher.match_batch(anchors, *a, _cfg()))(gt, valid, crowd)
  assert state.shape == (3, 40)
  for b in range(3):
    m, s = matcher.match(anchors, gt[b], valid[b], crowd[b], _cfg())
    np.testing.assert_array_equal(state[b], s)
    np.testing.assert_array_equal(matched[b], m)
