"""The device mesh and how every array is laid out on it, in one place.

Axes: 'data' (the batch is split over it) and 'model' (size `config.mesh.model_parallelism`,
1 by default): each image's rows are split over it (spatial partitioning, the technique of the
TPU MLPerf detection submissions, for images too large or pods too wide for one image per
chip). Parameters and optimiser state are replicated; batches are split on their leading
dimension over 'data' (each host feeds whole images; the model's first constraint slices their
rows on device). The mesh spans every device of every host, so the same code runs on one CPU,
one GPU or a TPU pod.

Activations: the models name their axes logically (`models.layers.FEATURE_MAP`, ('batch',
'height', 'width', 'channels')) and call `constrain`; `LOGICAL_RULES` maps those names to mesh
axes (flax's rule format, as MaxText's `logical_axis_rules`), the small-map rule decides which
maps are too small to split, and `logical_axes(mesh)` is the context that applies both.
"""

import contextlib
import contextvars
import math
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from retina_jax import sizes

DATA_AXIS = 'data'
MODEL_AXIS = 'model'
SWEEP_AXIS = 'sweep'


def make_mesh(config: ml_collections.ConfigDict, devices=None, sweep: int = 1) -> Mesh:
  """('data', 'model') over every device; a fused sweep's mesh (`sweep` > 1) has a leading
  'sweep' axis of that size, which the members are split over."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  model = config.mesh.model_parallelism
  if devices.size % (model * sweep):  # sizes' rule, which names a value that works.
    sizes.check_mesh(config, devices.size, members=sweep if sweep > 1 else 0)
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


# Logical axis -> the mesh axis it is split over (flax's rule format; None: kept whole). A
# feature map [B, H, W, C] has its images over 'data' and its rows over 'model'.
LOGICAL_RULES = (('batch', DATA_AXIS), ('height', MODEL_AXIS), ('width', None),
                 ('channels', None))

# The small-map rule: a logical axis listed here is split over its mesh axis only when each
# device gets at least this many of its elements and the split is even; otherwise it stays
# whole on every device of that mesh axis. One-row blocks would need halos as large as
# themselves, and the maps this leaves whole (P6, P7 of most images) are small.
MIN_PER_DEVICE = {'height': 2}

# The mesh of the innermost `logical_axes` context; None outside one.
_MESH = contextvars.ContextVar('retina_jax.sharding._MESH', default=None)


@contextlib.contextmanager
def logical_axes(mesh: Mesh | None):
  """Within it, `constrain` lays activations out on `mesh` by LOGICAL_RULES.

  A mesh whose 'model' axis has one device (or None) lays out nothing: a data-parallel program
  takes its layout from the batch's sharding alone.
  """
  token = _MESH.set(mesh if mesh is not None and mesh.shape[MODEL_AXIS] > 1 else None)
  try:
    yield
  finally:
    _MESH.reset(token)


def logical_spec(shape: Sequence[int], names: Sequence[str], mesh: Mesh) -> P:
  """The PartitionSpec of an array of `shape` whose axes are named `names`, on `mesh`:
  LOGICAL_RULES, then the small-map rule."""
  spec = nn.logical_to_mesh_axes(names, LOGICAL_RULES)

  def fits(size, name, axes):
    if axes is None or name not in MIN_PER_DEVICE:
      return True
    n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return size % n == 0 and size // n >= MIN_PER_DEVICE[name]

  return P(*(axes if fits(size, name, axes) else None
             for size, name, axes in zip(shape, names, spec)))


def constrain(x: jax.Array, names: Sequence[str]) -> jax.Array:
  """x with its axes, named `names` (one logical name per dimension), laid out on the mesh of
  the enclosing `logical_axes` context (`logical_spec`); x as is outside one. The constraint
  holds in the backward pass too (on the cotangent)."""
  mesh = _MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_spec(x.shape, names, mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """The rows of a global batch of `batch_size` split over 'data' that this process feeds to
  `to_global` (those its devices hold), as (index, count): rows [index * n, (index + 1) * n)
  for n = batch_size // count, the loaders' process_index and process_count. That is
  (jax.process_index(), jax.process_count()) on `make_mesh`'s mesh, whose 'data' axis spans the
  hosts in process order; where each host holds every row (a fused sweep's 'sweep' axis across
  the hosts, 'data' within each), (0, 1): every host feeds the whole batch."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
  blocks = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
                   for i in indices})
  first, last = blocks[0][0], blocks[-1][1]
  rows = last - first
  if (any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])) or batch_size % rows
      or first % rows):
    raise ValueError(f'Process {jax.process_index()} holds rows {blocks} of a batch of '
                     f'{batch_size}: not one of equal blocks, which the loaders feed.')
  return first // rows, batch_size // rows


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays split over 'data' (no copy across hosts)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)
