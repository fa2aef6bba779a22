"""The device mesh and how every array is laid out on it, in one place.

Axes: 'data' (the batch is split over it) and 'model' (size `config.mesh.model_parallelism`,
1 by default): each image's rows are split over it (spatial partitioning, the technique of the
TPU MLPerf detection submissions, for images too large or pods too wide for one image per
chip; `spatial_sharding`, applied to every feature map by the model). Parameters and optimiser
state are replicated; batches are split on their leading dimension over 'data' (each host
feeds whole images; the model's first constraint slices their rows on device). The mesh spans
every device of every host, so the same code runs on one CPU, one GPU or a TPU pod.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
MODEL_AXIS = 'model'
SWEEP_AXIS = 'sweep'


def make_mesh(config: ml_collections.ConfigDict, devices=None, sweep: int = 1) -> Mesh:
  """('data', 'model') over every device; a fused sweep's mesh (`sweep` > 1) has a leading
  'sweep' axis of that size, which the members are split over."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  model = config.mesh.model_parallelism
  if devices.size % (model * sweep):
    raise ValueError(f'{devices.size} devices cannot be split into a model axis of {model} '
                     '(config.mesh.model_parallelism)' + (
                         f' and a sweep axis of {sweep} (config.mesh.sweep_parallelism)'
                         if sweep > 1 else ''))
  if sweep == 1:
    return Mesh(devices.reshape(devices.size // model, model), (DATA_AXIS, MODEL_AXIS))
  return Mesh(devices.reshape(sweep, devices.size // (model * sweep), model),
              (SWEEP_AXIS, DATA_AXIS, MODEL_AXIS))


def member_sharding(mesh: Mesh) -> NamedSharding:
  """A fused sweep's arrays with a leading member axis [M, ...]: split over 'sweep' where the
  mesh has it, replicated otherwise."""
  return NamedSharding(mesh, P(SWEEP_AXIS) if SWEEP_AXIS in mesh.axis_names else P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', everything else replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def spatial_sharding(mesh: Mesh) -> NamedSharding | None:
  """Feature maps [B, H, W, C]: batch over 'data', rows over 'model'; None when the 'model'
  axis has one device (no spatial partitioning)."""
  if mesh.shape[MODEL_AXIS] == 1:
    return None
  return NamedSharding(mesh, P(DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = 'config.batch_size') -> int:
  """Returns the host-local batch size, or says how to fix an indivisible global batch."""
  data_size = mesh.shape[DATA_AXIS]
  if global_batch % data_size or global_batch % jax.process_count():
    raise ValueError(f'{what}={global_batch} must be a multiple of the data-parallel size '
                     f'{data_size} and of the number of hosts {jax.process_count()}')
  return global_batch // jax.process_count()


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays split over 'data' (no copy across hosts)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)
