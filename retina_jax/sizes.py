"""Every size rule a run depends on, in one place, checked once at start-up.

Training (`train.train_and_evaluate`), `evaluate`, `export` and `tools/pod_plan` call `check`
(or `check_here`) before they build anything, so that a batch the pod cannot split, a mesh the
devices cannot form or a canvas the model cannot tile stops the run with one line naming the
field and a value that works, on every host alike, instead of a traceback from inside a jit at
the first evaluation. The rules:
  - the mesh: config.mesh.model_parallelism (x config.mesh.sweep_parallelism for a fused sweep,
    whose members it must divide) divides the devices; on several hosts it divides each host's
    devices too, as each host feeds whole images (an image's chips are on one host);
  - the batches: config.batch_size and config.eval_batch_size are multiples of the data-parallel
    size (devices / model axis) and of the number of hosts (each host feeds an equal share);
    config.eval_batch_size=0 takes `default_eval_batch_size`, which works on any pod;
  - export's --batch_size: 0 (any batch, symbolic) or a positive number;
  - the canvases: config.data.image_size a positive multiple of the stride of C5, the resize
    sides positive, and the bucket rules known ones.
"""

import dataclasses
import math

import jax
import ml_collections

from retina_jax import anchors as anchors_lib

# The eval batch when config.eval_batch_size=0 is at least this (rounded up to what the pod
# splits): on one device it is the eval batch the project always had.
MIN_EVAL_BATCH = 8


class SizeError(ValueError):
  """One line: the field, why its value cannot work here, and a value that does."""


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The sizes a run uses on `devices` devices over `hosts` hosts, checked."""
  devices: int
  hosts: int
  data: int  # The data-parallel size: devices / (model x sweep axes).
  model: int
  batch_size: int
  eval_batch_size: int  # Resolved: never 0.


def _round_up(x: int, m: int) -> int:
  return max(1, -(-int(x) // m)) * m


def default_eval_batch_size(data: int, hosts: int) -> int:
  """The eval batch of config.eval_batch_size=0: the smallest multiple of the data-parallel size
  and of the number of hosts that is at least MIN_EVAL_BATCH (8 on up to 8 devices, 16 on
  v5e:4x4, 256 on v5e:16x16); the last batch is padded, as any."""
  return _round_up(MIN_EVAL_BATCH, math.lcm(data, hosts))


def check_mesh(config: ml_collections.ConfigDict, devices: int, hosts: int = 1,
               members: int = 0) -> tuple[int, int]:
  """(data-parallel size, model axis) of the mesh `sharding.make_mesh` builds on `devices`;
  `members` > 0: a fused sweep of that many members over config.mesh.sweep_parallelism."""
  model = int(config.mesh.model_parallelism)
  sweep = int(config.mesh.get('sweep_parallelism', 1)) if members else 1
  per_host = devices // hosts
  if model < 1:
    raise SizeError(f'config.mesh.model_parallelism={model} must be at least 1: e.g. '
                    '--config.mesh.model_parallelism=1')
  if sweep < 1 or (members and members % sweep):
    raise SizeError(f'config.mesh.sweep_parallelism={sweep} must divide the number of fused '
                    f'members ({members}): e.g. --config.mesh.sweep_parallelism=1')
  if devices % sweep:
    raise SizeError(f'config.mesh.sweep_parallelism={sweep} must divide the {devices} devices: '
                    'e.g. --config.mesh.sweep_parallelism=1')
  if (devices // sweep) % model:
    works = max(d for d in range(1, model + 1) if (devices // sweep) % d == 0)
    raise SizeError(
        f'config.mesh.model_parallelism={model} must divide the {devices} devices' + (
            f' with config.mesh.sweep_parallelism={sweep}' if sweep > 1 else '') +
        f': e.g. --config.mesh.model_parallelism={works}')
  if hosts > 1 and per_host % model:
    works = max(d for d in range(1, model + 1) if per_host % d == 0)
    raise SizeError(f'config.mesh.model_parallelism={model} splits each image over more chips '
                    f'than the {per_host} of one host (each host feeds whole images): e.g. '
                    f'--config.mesh.model_parallelism={works}')
  return devices // (model * sweep), model


def check_batch(field: str, value: int, data: int, hosts: int):
  """`field`=`value` (a global batch) must split over the data-parallel size and the hosts."""
  multiple = math.lcm(data, hosts)
  if value < 1 or value % multiple:
    raise SizeError(f'{field}={value} must be a multiple of the data-parallel size {data} and of '
                    f'the number of hosts {hosts}: e.g. --{field}={_round_up(value, multiple)}')


def check_export_batch(batch_size: int):
  """export's --batch_size: 0 exports a symbolic batch (any size), else the fixed B."""
  if batch_size < 0:
    raise SizeError(f'--batch_size={batch_size} must be 0 (any batch size) or positive: e.g. '
                    '--batch_size=0')


def check_canvases(data_config: ml_collections.ConfigDict):
  """The sizes the canvases are made from (canvas.canvas_for): every canvas is then a
  multiple of the stride of C5, which the anchors and the FPN need."""
  from retina_jax.data import canvas  # pylint: disable=g-import-not-at-top
  m = anchors_lib.SIZE_MULTIPLE
  s = int(data_config.image_size)
  if s < m or s % m:
    raise SizeError(f'config.data.image_size={s} must be a positive multiple of {m} (the stride '
                    f'of C5): e.g. --config.data.image_size={_round_up(s, m)}')
  for field in ('min_size', 'max_size'):
    if int(data_config[field]) < 1:
      raise SizeError(f'config.data.{field}={data_config[field]} must be positive: e.g. '
                      f'--config.data.{field}={s}')
  for size in data_config.get('train_min_sizes', ()):
    if int(size) < 1:
      raise SizeError(f'config.data.train_min_sizes={tuple(data_config.train_min_sizes)} must '
                      f'all be positive: e.g. --config.data.train_min_sizes=()')
  for field in ('train_buckets', 'eval_buckets'):
    if data_config.get(field, 'orientation') not in canvas.BUCKETS:
      raise SizeError(f'config.data.{field}={data_config[field]!r} must be one of '
                      f"{canvas.BUCKETS}: e.g. --config.data.{field}=square")


def check(config: ml_collections.ConfigDict, devices: int, hosts: int = 1, *,
          train: bool = True, evaluate: bool = True, export_batch: int | None = None,
          members: int = 0) -> Sizes:
  """Checks every size rule of the module docstring that the run uses: the canvases always, the
  mesh and the training batch when `train`, the mesh and the eval batch when `evaluate`, and
  export's --batch_size when `export_batch` is given. Raises SizeError (one line)."""
  check_canvases(config.data)
  if export_batch is not None:
    check_export_batch(export_batch)
  data, model = check_mesh(config, devices, hosts, members) if train or evaluate else (1, 1)
  batch = int(config.batch_size)
  if train:
    check_batch('config.batch_size', batch, data, hosts)
  eval_batch = eval_batch_size(config, data, hosts) if evaluate else int(config.eval_batch_size)
  return Sizes(devices=devices, hosts=hosts, data=data, model=model, batch_size=batch,
               eval_batch_size=eval_batch)


def eval_batch_size(config: ml_collections.ConfigDict, data: int, hosts: int) -> int:
  """The eval batch a run on `data` data shards over `hosts` hosts uses: config.eval_batch_size,
  checked, or `default_eval_batch_size` when it is 0."""
  value = int(config.eval_batch_size)
  if value == 0:
    return default_eval_batch_size(data, hosts)
  check_batch('config.eval_batch_size', value, data, hosts)
  return value


def check_here(config: ml_collections.ConfigDict, **kwargs) -> Sizes:
  """`check` on this process's devices and hosts."""
  return check(config, jax.device_count(), jax.process_count(), **kwargs)


def with_eval_batch(config: ml_collections.ConfigDict, eval_batch: int
                    ) -> ml_collections.ConfigDict:
  """`config` with eval_batch_size `eval_batch` (a copy when it differs), for the evaluator,
  which takes the number as it is."""
  if int(config.eval_batch_size) == eval_batch:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_batch_size = eval_batch
  return config
