import math

import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from retina_jax import box_coder
from tests import oracles

CLAMP = math.log(1000.0 / 16)


def _boxes(rng, n):
  xy = rng.uniform(0, 500, (n, 2))
  wh = rng.uniform(4, 300, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip(weights):
  rng = np.random.default_rng(0)
  boxes, anchors = _boxes(rng, 64), _boxes(rng, 64)
  deltas = jax.jit(box_coder.encode, static_argnums=2)(boxes, anchors, weights)
  back = box_coder.decode(deltas, anchors, weights, CLAMP)
  np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_equals_torchvision_box_coder(weights):
  rng = np.random.default_rng(1)
  boxes, anchors = _boxes(rng, 100), _boxes(rng, 100)
  deltas = rng.normal(0, 1, (100, 4)).astype(np.float32)
  deltas[:5, 2:] = 8.0  # Beyond the clamp.
  tv = det_utils.BoxCoder(weights)
  tv_enc = tv.encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(box_coder.encode(boxes, anchors, weights), tv_enc, rtol=1e-5, atol=1e-5)
  tv_dec = tv.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
  ours = np.asarray(box_coder.decode(deltas, anchors, weights, CLAMP))
  np.testing.assert_allclose(ours, tv_dec, rtol=1e-6, atol=1e-3)
  np.testing.assert_allclose(ours, oracles.decode(deltas, anchors, weights), rtol=1e-5, atol=1e-3)


def test_known_values_and_clamp():
  anchor = np.array([0, 0, 10, 20], np.float32)
  box = np.array([5, 0, 25, 10], np.float32)  # centre (15, 5) vs (5, 10); size (20, 10) vs (10, 20).
  np.testing.assert_allclose(box_coder.encode(box, anchor), [1.0, -0.25, math.log(2), math.log(0.5)],
                             rtol=1e-6)
  huge = box_coder.decode(np.array([0, 0, 50, 50], np.float32), anchor, clamp=CLAMP)
  np.testing.assert_allclose(huge[2] - huge[0], 10 * 1000 / 16, rtol=1e-5)


def test_encode_is_finite_for_padded_targets():
  anchors = np.tile(np.array([[0, 0, 32, 32]], np.float32), (3, 1))
  padded = np.zeros((3, 4), np.float32)
  assert np.isfinite(np.asarray(box_coder.encode(padded, anchors))).all()


def test_batched_shapes_broadcast():
  rng = np.random.default_rng(2)
  anchors = _boxes(rng, 7)
  deltas = rng.normal(0, 0.5, (3, 7, 4)).astype(np.float32)
  out = box_coder.decode(deltas, anchors)
  assert out.shape == (3, 7, 4)
  np.testing.assert_allclose(out[1], box_coder.decode(deltas[1], anchors), rtol=1e-6)
