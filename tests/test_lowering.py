"""The convolution formulation is chosen per platform when lowering (models/layers.conv2d):
lowered on this CPU host for TPU or CUDA, the train step and the detector get native
convolutions throughout (forward and both gradients); lowered for CPU, the GEMM formulation."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import inference
from retina_jax import models
from retina_jax import sharding as sharding_lib
from retina_jax import train
from tests import tiny_detector


def _op_counts(lowered) -> dict[str, int]:
  text = lowered.as_text()
  return {op: text.count(f'stablehlo.{op}') for op in ('convolution', 'dot_general')}


@pytest.fixture(scope='module')
def lowerings():
  """{(what, platform): op counts} for the tiny train step and detector."""
  config = tiny_detector.tiny_config(64)
  config.batch_size = 2
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  model = models.create_model(config)
  state, tx = train.abstract_train_state(config, model, mesh)
  step = train.make_train_step(config, model, tx, mesh).trace(state,
                                                              train.abstract_batch(config, mesh))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  detect = inference.make_detect_fn(config, model).trace(
      variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8),
      jax.ShapeDtypeStruct((2, 2), jnp.int32))
  return {(what, platform): _op_counts(traced.lower(lowering_platforms=(platform,)))
          for what, traced in (('train', step), ('detect', detect))
          for platform in ('cpu', 'tpu', 'cuda')}


@pytest.mark.parametrize('what', ['train', 'detect'])
@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_accelerator_lowerings_have_only_native_convolutions(lowerings, what, platform):
  counts = lowerings[what, platform]
  assert counts['convolution'] > 0
  # The CPU formulation's 1x1 convs and weight gradients are the only matrix products.
  assert counts['dot_general'] == 0, counts


@pytest.mark.parametrize('what', ['train', 'detect'])
def test_cpu_lowering_keeps_the_gemm_formulation(lowerings, what):
  cpu, tpu = lowerings[what, 'cpu'], lowerings[what, 'tpu']
  assert cpu['dot_general'] > 0
  assert cpu['convolution'] < tpu['convolution']


def test_export_for_cpu_cuda_tpu_runs_the_cpu_branch_here():
  config = tiny_detector.tiny_config(64)
  variables = tiny_detector.random_variables(config)
  images, hw = tiny_detector.random_images(2, 64)
  detect = inference.make_detect_fn(config)
  exported = jax.export.export(detect, platforms=('cpu', 'cuda', 'tpu'))(variables, images, hw)
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  got, want = exported.call(variables, images, hw), detect(variables, images, hw)
  for key in want:
    assert jnp.array_equal(got[key], want[key]), key


@pytest.mark.parametrize('k, stride, pad, h, w', [
    (3, 1, 1, 9, 8), (3, 2, 1, 9, 8), (3, 2, 1, 8, 8), (1, 2, 0, 8, 7), (1, 1, 0, 5, 5),
    (7, 2, 3, 17, 16)])
def test_native_weight_gradient_equals_autodiff(k, stride, pad, h, w):
  """TPU's kernel gradient (one float32-accumulating convolution) is the one
  autodiff gives, on odd and even sides, strides 1 and 2, with and without padding."""
  from retina_jax.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 3, 5)), jnp.float32)
  y, vjp = jax.vjp(lambda k_: layers._xla_conv(x, k_, stride, pad), kernel)  # pylint: disable=protected-access
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  got = layers.native_weight_grad(x, dy, k, stride, pad)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-5, atol=1e-5)
  # In bfloat16 the result is still float32, with float32 accumulation.
  got16 = layers.native_weight_grad(x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16), k, stride,
                                    pad)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(got16, vjp(dy)[0], rtol=0.05, atol=0.05 * np.abs(got).max())


def test_bf16_train_step_traces_without_dtype_promotion_warnings():
  """jax warns (FutureWarning, an error in later releases) where a scatter would cast its
  float32 update into a bfloat16 operand; the bfloat16 train step must cast explicitly."""
  config = tiny_detector.tiny_config(64)
  config.batch_size, config.model.dtype = 2, 'bfloat16'
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  model = models.create_model(config)
  state, tx = train.abstract_train_state(config, model, mesh)
  with warnings.catch_warnings():
    warnings.simplefilter('error', FutureWarning)
    train.make_train_step(config, model, tx, mesh).trace(state, train.abstract_batch(config, mesh))
