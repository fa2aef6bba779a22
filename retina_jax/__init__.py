"""retina_jax: RetinaNet and focal loss in JAX/Flax."""

import importlib.util


def _skip_absent_tpu():
  """With the TPU runtime installed (requirements-tpu.txt: the tests and pod_plan compile for
  TPU topologies) but no TPU chip here, jax would still start a TPU backend on every run, and
  libtpu prints five lines of errors (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) before jax
  falls back to the CPU. Every entry point imports this package first, so the CPU is chosen
  here, before any backend starts. An explicit JAX_PLATFORMS, a TPU VM, or an installed GPU
  plugin (jax_plugins) leave jax's own choice alone.
  """
  if importlib.util.find_spec('libtpu') is None or importlib.util.find_spec('jax_plugins'):
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_platforms and not hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    jax.config.update('jax_platforms', 'cpu')


_skip_absent_tpu()
