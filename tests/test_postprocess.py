import functools

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import retinanet as tv_retinanet

from retina_jax import anchors as anchors_lib
from retina_jax import config as config_lib
from retina_jax import postprocess
from tests import oracles

HW = (128, 128)


def _cfg(**post):
  config = config_lib.get_base_config()
  for k, v in post.items():
    setattr(config.postprocess, k, v)
  for k, v in dict(offset=0.0, truncate_sizes=True, round_base=True).items():
    setattr(config.anchors, k, v)
  return config


def _anchors(config):
  anchors = anchors_lib.generate_anchors(config.anchors, 3, 7, HW)
  return anchors, anchors_lib.anchors_per_level(config.anchors, 3, 7, HW)


@functools.lru_cache(maxsize=None)
def _jitted(post_items, level_sizes):
  config = _cfg(**dict(post_items))
  anchors, _ = _anchors(config)
  return jax.jit(lambda l, d, hw: postprocess.postprocess(
      l, d, anchors, level_sizes, hw, config.postprocess, config.box_coder))


def _run(config, logits, deltas, hw):
  _, level_sizes = _anchors(config)
  fn = _jitted(tuple(config.postprocess.items()), level_sizes)
  return {k: np.asarray(v) for k, v in fn(logits, deltas, np.asarray(hw, np.int32)).items()}


def oracle_postprocess(logits, deltas, anchors, level_sizes, hw, post):
  """One image, torchvision's steps with plain numpy; ties ranked by flat index."""
  num_classes = logits.shape[1]
  boxes, scores, labels = [], [], []
  start = 0
  for n in level_sizes:
    s = (1 / (1 + np.exp(-logits[start:start + n].astype(np.float64)))).astype(np.float32).ravel()
    idx = np.flatnonzero(s > post.score_threshold)
    idx = idx[np.lexsort((idx, -s[idx]))][:post.pre_nms_topk]
    a = start + idx // num_classes
    b = oracles.decode(deltas[a], anchors[a])
    b[:, 0::2] = np.clip(b[:, 0::2], 0, hw[1])
    b[:, 1::2] = np.clip(b[:, 1::2], 0, hw[0])
    boxes.append(b)
    scores.append(s[idx])
    labels.append(idx % num_classes)
    start += n
  boxes, scores, labels = (np.concatenate(x) for x in (boxes, scores, labels))
  kept = oracles.greedy_nms(boxes, scores, np.ones(len(scores), bool), post.nms_iou,
                            labels)[:post.max_detections]
  return boxes[kept], scores[kept], labels[kept]


def _check_image(out, b, want_boxes, want_scores, want_labels, box_atol):
  n = len(want_scores)
  d = out['valid'].shape[1]
  assert out['valid'][b].sum() == n and out['valid'][b, :n].all()
  np.testing.assert_array_equal(out['labels'][b, :n], want_labels)
  np.testing.assert_allclose(out['scores'][b, :n], want_scores, atol=1e-6)
  np.testing.assert_allclose(out['boxes'][b, :n], want_boxes, atol=box_atol)
  assert (out['scores'][b, n:] == 0).all() and (out['boxes'][b, n:] == 0).all()
  assert out['scores'].shape == (out['valid'].shape[0], d)


def _inputs(rng, n, num_classes, batch=2, values=None):
  if values is None:
    logits = rng.normal(-4.0, 1.5, (batch, n, num_classes))
  else:
    logits = rng.choice(values, (batch, n, num_classes), p=[0.6, 0.3, 0.095, 0.005])
  deltas = rng.normal(0.0, 0.3, (batch, n, 4))
  return logits.astype(np.float32), deltas.astype(np.float32)


@pytest.mark.parametrize('ties', [False, True])
def test_matches_numpy_oracle(ties):
  # With ties, more detections than top-value pairs so that the tied boundary reaches the output.
  config = _cfg(pre_nms_topk=200, max_detections=300 if ties else 50)
  anchors, level_sizes = _anchors(config)
  rng = np.random.default_rng(int(ties))
  logits, deltas = _inputs(rng, len(anchors), 6, values=[-6.0, -2.5, 0.0, 1.5] if ties else None)
  if ties:
    # Boxes are the anchors: equal scores on overlapping, equal boxes. The rare top value keeps
    # the top-k boundary inside a tie shared by anchors whose best scores differ.
    deltas[:] = 0.0
  hw = [[128, 128], [100, 90]]
  out = _run(config, logits, deltas, hw)
  for b in range(2):
    want = oracle_postprocess(logits[b], deltas[b], anchors, level_sizes, hw[b], config.postprocess)
    _check_image(out, b, *want, box_atol=1e-3)
    assert out['boxes'][b, :, 2].max() <= hw[b][1] and out['boxes'][b, :, 3].max() <= hw[b][0]
  assert out['valid'][:, :50].all()


def test_equals_torchvision_postprocess_detections():
  config = _cfg()  # Default: topk 1000, NMS 0.5, 100 detections.
  anchors, level_sizes = _anchors(config)
  rng = np.random.default_rng(5)
  num_classes = 20
  logits, deltas = _inputs(rng, len(anchors), num_classes)
  hw = [[128, 128], [100, 90]]
  out = _run(config, logits, deltas, hw)

  model = tv_retinanet.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                              num_classes=num_classes)
  post = config.postprocess
  model.score_thresh, model.nms_thresh = post.score_threshold, post.nms_iou
  model.detections_per_img, model.topk_candidates = post.max_detections, post.pre_nms_topk
  split = np.cumsum(level_sizes)[:-1]
  head = {'cls_logits': [torch.from_numpy(x) for x in np.split(logits, split, axis=1)],
          'bbox_regression': [torch.from_numpy(x) for x in np.split(deltas, split, axis=1)]}
  tv_anchors = [[torch.from_numpy(x) for x in np.split(anchors, split)]] * 2
  with torch.no_grad():
    dets = model.postprocess_detections(head, tv_anchors, [tuple(x) for x in hw])
  for b, det in enumerate(dets):
    assert len(det['scores']) > 10
    _check_image(out, b, det['boxes'].numpy(), det['scores'].numpy(), det['labels'].numpy(),
                 box_atol=1e-4)


def test_all_below_threshold_and_fewer_candidates_than_detections():
  config = _cfg()
  anchors, _ = _anchors(config)
  logits = np.full((1, len(anchors), 3), -10.0, np.float32)
  logits[0, 5, 2] = 3.0  # One detection only.
  out = _run(config, logits, np.zeros((1, len(anchors), 4), np.float32), [[128, 128]])
  assert out['valid'].sum() == 1 and out['labels'][0, 0] == 2
  np.testing.assert_allclose(out['boxes'][0, 0], np.clip(anchors[5], 0, 128))
  logits[0, 5, 2] = -10.0
  out = _run(config, logits, np.zeros((1, len(anchors), 4), np.float32), [[128, 128]])
  assert not out['valid'].any() and (out['scores'] == 0).all() and (out['boxes'] == 0).all()

  tiny = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
  out = postprocess.postprocess(np.zeros((1, 3, 2), np.float32), np.zeros((1, 3, 4), np.float32),
                                tiny, (2, 1), np.array([[64, 64]]), config.postprocess,
                                config.box_coder)
  assert out['valid'].shape == (1, 100)
  # 6 pairs at score 0.5; anchor 2 duplicates anchor 0, so its two pairs are suppressed.
  assert int(out['valid'].sum()) == 4
  np.testing.assert_array_equal(out['labels'][0, :4], [0, 1, 0, 1])


@pytest.mark.parametrize('with_labels', [False, True])
def test_nms_matches_oracle_and_torchvision(with_labels):
  rng = np.random.default_rng(11)
  m = 300
  xy = rng.uniform(0, 100, (m, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (m, 2))], 1).astype(np.float32)
  scores = rng.random(m).astype(np.float32)
  valid = rng.random(m) < 0.9
  labels = rng.integers(0, 3, m).astype(np.int32) if with_labels else None
  keep = np.asarray(jax.jit(postprocess.nms, static_argnums=3)(boxes, scores, valid, 0.5, labels))
  want = np.zeros(m, bool)
  want[oracles.greedy_nms(boxes, scores, valid, 0.5, labels)] = True
  np.testing.assert_array_equal(keep, want)
  assert 0 < keep.sum() < valid.sum()
  idx = np.flatnonzero(valid)
  tb, ts = torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx])
  if with_labels:
    tv = torchvision.ops.batched_nms(tb, ts, torch.from_numpy(labels[idx]), 0.5)
  else:
    tv = torchvision.ops.nms(tb, ts, 0.5)
  np.testing.assert_array_equal(np.flatnonzero(keep), np.sort(idx[tv.numpy()]))
  # Stopping early keeps the best survivors only.
  first = np.asarray(postprocess.nms(boxes, scores, valid, 0.5, labels, max_output=7))
  want_first = np.zeros(m, bool)
  want_first[oracles.greedy_nms(boxes, scores, valid, 0.5, labels)[:7]] = True
  np.testing.assert_array_equal(first, want_first)


def test_nms_ties_keep_the_lower_index():
  boxes = np.array([[0, 0, 10, 10]] * 3 + [[50, 50, 60, 60]], np.float32)
  scores = np.array([0.5, 0.5, 0.5, 0.1], np.float32)
  keep = postprocess.nms(boxes, scores, np.ones(4, bool), 0.5)
  np.testing.assert_array_equal(keep, [True, False, False, True])
  keep = postprocess.nms(boxes, scores, np.array([False, True, True, True]), 0.5,
                         np.array([0, 0, 1, 0]))
  np.testing.assert_array_equal(keep, [False, True, True, True])
