import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from retina_jax import box_ops
from tests import oracles


def _random_boxes(rng, n, size=100.0, degenerate=0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, size / 2, (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  boxes[:degenerate, 2] = boxes[:degenerate, 0]  # Zero width.
  return boxes


def test_pairwise_iou_matches_oracle_and_torchvision():
  rng = np.random.default_rng(0)
  a = _random_boxes(rng, 13, degenerate=2)
  b = _random_boxes(rng, 7, degenerate=1)
  b = np.concatenate([b, np.zeros((2, 4), np.float32)])  # Padded slots.
  got = np.asarray(jax.jit(box_ops.pairwise_iou)(a, b))
  np.testing.assert_allclose(got, oracles.iou(a, b), atol=1e-6)
  tv = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  finite = np.isfinite(tv)  # torchvision gives NaN on zero union; we give 0.
  np.testing.assert_allclose(got[finite], tv[finite], atol=1e-6)
  assert not np.isfinite(tv).all() and np.isfinite(got).all()
  assert (got[:, -2:] == 0).all() and (got[:2] == 0).all()
  assert got.max() > 0.1


def test_iou_gradient_is_finite_on_degenerate_boxes():
  a = jnp.zeros((3, 4))
  g = jax.grad(lambda a: box_ops.pairwise_iou(a, a).sum())(a)
  assert np.isfinite(np.asarray(g)).all()


def test_pairwise_ioa():
  rng = np.random.default_rng(1)
  a = _random_boxes(rng, 9, degenerate=1)
  b = _random_boxes(rng, 5)
  got = np.asarray(box_ops.pairwise_ioa(a, b))
  np.testing.assert_allclose(got, oracles.ioa(a, b), atol=1e-6)
  inside = np.array([[10, 10, 20, 20]], np.float32)
  crowd = np.array([[0, 0, 100, 100], [15, 10, 20, 20]], np.float32)
  np.testing.assert_allclose(box_ops.pairwise_ioa(inside, crowd), [[1.0, 0.5]])


def test_elementwise_giou_matches_torchvision():
  rng = np.random.default_rng(2)
  a = _random_boxes(rng, 20)
  b = _random_boxes(rng, 20)
  got = np.asarray(jax.jit(box_ops.elementwise_giou)(a, b))
  tv = torchvision.ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  np.testing.assert_allclose(got, np.diag(tv), atol=1e-6)
  assert got.min() < 0  # Disjoint pairs are penalised below 0.
  np.testing.assert_allclose(box_ops.elementwise_giou(a, a), 1.0, atol=1e-6)
  zero = jnp.zeros((2, 4))
  assert np.isfinite(np.asarray(box_ops.elementwise_giou(zero, zero))).all()


def test_area():
  boxes = np.array([[0, 0, 2, 3], [5, 5, 4, 9]], np.float32)
  np.testing.assert_array_equal(box_ops.area(boxes), [6, 0])


def test_clip_boxes_per_image():
  boxes = np.array([[[-5, -5, 50, 50], [10, 20, 300, 400]],
                    [[-5, -5, 50, 50], [10, 20, 300, 400]]], np.float32)  # [B=2, N=2, 4]
  hw = np.array([[100, 200], [30, 40]], np.int32)  # (h, w)
  got = np.asarray(jax.jit(box_ops.clip_boxes)(boxes, hw))
  np.testing.assert_array_equal(got[0], [[0, 0, 50, 50], [10, 20, 200, 100]])
  np.testing.assert_array_equal(got[1], [[0, 0, 40, 30], [10, 20, 40, 30]])
  tv = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes[1]), (30, 40)).numpy()
  np.testing.assert_array_equal(got[1], tv)
