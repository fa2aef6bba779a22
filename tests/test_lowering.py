"""The convolution formulation is chosen per platform when lowering (models/layers.conv2d):
lowered on this CPU host for TPU or CUDA, the train step and the detector get native
convolutions throughout (forward and both gradients); lowered for CPU, the GEMM formulation."""

import jax
import jax.numpy as jnp
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
