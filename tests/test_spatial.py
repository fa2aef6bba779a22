"""Spatial partitioning (config.mesh.model_parallelism > 1 on the 4 fake CPU devices): every
feature map's rows are split over the 'model' axis, and the step computes what the
unpartitioned step computes, on canvases where some levels split and some cannot.

The backbone norm here is frozen BN (R50's) or synchronized BN, with GroupNorm in the heads
(their statistics then span the row blocks). Not covered: the tiny model with a GroupNorm
backbone, whose gradients are ill-conditioned on these padded images: scaling its input by
1 + 1e-7 on one device, unpartitioned, already moves layer2's weight gradients by 2%, so no
tolerance can tell a partitioning error from float32 rounding there. Nor are several hosts
covered (every model group here is on one host), nor the numbers on a real TPU: there the
partitioned step is only compiled (tests/test_pod_plan.py), not run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retina_jax import models
from retina_jax import sharding as sharding_lib
from retina_jax import train
from tests import tiny_detector


def _keep_gradients(config, params):
  """An 'optimiser' that leaves the parameters and keeps the last gradient as its state."""
  del config, params
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def _batch(canvas):
  """2 images with boxes from 12 px to most of the canvas, so that every level, P7 included,
  has foreground anchors and real gradients."""
  h, w = canvas
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, h, w, 3)).astype(np.uint8)
  wh = np.concatenate([rng.uniform(12, 60, (2, 4, 2)),
                       rng.uniform(100, 0.9 * min(h, w), (2, 4, 2))], axis=1)
  xy = rng.uniform(0, 1, (2, 8, 2)) * (np.array([w, h]) - wh)
  return {'image': images, 'image_hw': np.array([[h, w], [h - 40, w - 8]], np.int32),
          'boxes': np.concatenate([xy, xy + wh], -1).astype(np.float32),
          'labels': rng.integers(0, 3, (2, 8)).astype(np.int32),
          'is_crowd': np.zeros((2, 8), bool), 'box_valid': np.arange(8)[None].repeat(2, 0) < 7}


def _step(canvas, model_parallelism: int, devices, norm: str):
  config = tiny_detector.tiny_config(max(canvas))
  config.model.norm = norm
  config.model.head_norm = 'gn'
  config.batch_size = 2
  config.mesh.model_parallelism = model_parallelism
  mesh = sharding_lib.make_mesh(config, devices)
  model = models.create_model(config, mesh)
  state, tx = train.create_train_state(config, model, mesh, tx_fn=_keep_gradients)
  step = train.make_train_step(config, model, tx, mesh)
  batch = sharding_lib.to_global(_batch(canvas), mesh)
  hlo = step.lower(state, batch).compile().as_text()
  new_state, metrics = step(state, batch)
  return jax.device_get(new_state.opt_state), jax.device_get(metrics), hlo


# (canvas, model axis, backbone norm): 320x256 splits C2..C5 in 2 and leaves P6 (5 rows) and
# P7 (3) whole; 256x256 over 2 has P7 at 1 row per device (left whole); over 4, P6 and P7 stay
# whole. Synchronized BN's batch statistics span the row blocks.
CASES = [((320, 256), 2, 'frozen_bn'), ((256, 256), 2, 'bn'), ((256, 256), 4, 'frozen_bn')]


@pytest.fixture(scope='module', params=CASES,
                ids=lambda c: f'{c[0][0]}x{c[0][1]}-model{c[1]}-{c[2]}')
def steps(request):
  canvas, model, norm = request.param
  devices = jax.devices()
  assert len(devices) == 4, 'tests/conftest.py sets 4 fake CPU devices'
  # The reference: the same global batch, data parallel only, over as many data shards.
  return (canvas, model, _step(canvas, 1, devices[:4 // model], norm),
          _step(canvas, model, devices, norm))


def test_loss_and_gradients_equal_the_unpartitioned_step(steps):
  _, _, (grads_1, metrics_1, _), (grads_n, metrics_n, _) = steps
  for key in ('loss', 'cls_loss', 'box_loss', 'num_foreground', 'grad_norm'):
    np.testing.assert_allclose(metrics_n[key], metrics_1[key], rtol=1e-5, err_msg=key)
  flat_1 = jax.tree_util.tree_leaves_with_path(grads_1)
  flat_n = jax.tree.leaves(grads_n)
  assert len(flat_1) == len(flat_n) > 10
  for (path, g1), gn in zip(flat_1, flat_n):
    assert np.abs(g1).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(gn, g1, rtol=1e-5, atol=1e-5 * np.abs(g1).max(),
                               err_msg=jax.tree_util.keystr(path))


def test_each_device_computes_its_share_of_every_image_row(steps):
  (h, w), model, (_, _, hlo_1), (_, _, hlo_n) = steps
  stem = lambda hlo: sorted(set(re.findall(
      r'= f32\[(\d+),(\d+),(\d+),16\][^\n]* convolution\([^\n]*backbone/conv1/', hlo)))
  # The stem's output per device: its images (2 over 4 / model data shards), whole in the
  # reference, and their rows split over the model axis.
  images = str(2 // (4 // model))
  assert stem(hlo_1) == [(images, str(h // 2), str(w // 2))]
  assert stem(hlo_n) == [(images, str(h // 2 // model), str(w // 2))]
