"""A sweep's members trained side by side in one jitted program, one input stream, one workdir
per member.

Members whose configs differ only in FUSED_FIELDS (the focal loss's alpha and gamma, the box
loss weight, the base learning rate, the weight decay) are one program: the train state gets a
leading member axis [M, ...], `jax.vmap` maps `train.train_step` over it with the batch shared,
and each member's numbers are traced float32 scalars, so that its loss and its optimiser
(learning-rate schedule included) are its own. Each member's state keeps the layout of a
separate run's, so that its checkpoints are the ones `train.train_and_evaluate` writes.

Every other field must be equal within a fused group: shapes and structure (anchors, image
size, backbone, batch) change the program, and config.seed picks both the initial parameters
and the order and augmentation draws of the batches, so members with another seed cannot share
the input stream. `plan` splits a sweep into such groups (and by the step each member resumes
at), naming the fields that split it; the groups run one after another.

Each member's workdir holds what a separate run of its config writes there (config.json,
metrics.jsonl, TensorBoard events, checkpoints, the evaluation's metrics_<split>.json), so
evaluate, export, predict and a re-run of the sweep (which resumes or skips each member) work
per member. A member whose loss or gradient goes non-finite is stopped: its updates are masked
from that step on (`train.train_step`), its last good checkpoint stays the newest, and its log
and metrics.jsonl say so; the other members go on.

On several hosts every host runs the same sweep (one process each): the mesh spans every
device, each host loads the rows of each batch that its devices hold, the decisions read from
the workdirs (which members to train, where they resume) are process 0's (`agreed`), and only
process 0 writes the logs, configs and the summary, as for a separate run.
"""

import functools
import json
import logging
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from retina_jax import checkpoint as ckpt
from retina_jax import fileio
from retina_jax import metrics as metrics_lib
from retina_jax import models
from retina_jax import optim
from retina_jax import run_control
from retina_jax import sharding as sharding_lib
from retina_jax import sizes
from retina_jax import train
from retina_jax.data import pipeline

# Config paths that may differ between the members of one fused group; each becomes a traced
# per-member number named by its last part (`train.train_step`'s hparams).
FUSED_FIELDS = ('loss.alpha', 'loss.gamma', 'loss.box_weight', 'optim.base_lr',
                'optim.weight_decay')


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _structure_key(config: ml_collections.ConfigDict) -> str:
  flat = _flatten(config.to_dict())
  return json.dumps({k: v for k, v in flat.items() if k not in FUSED_FIELDS}, sort_keys=True,
                    default=str)


def unfusable_fields(configs: Sequence[ml_collections.ConfigDict]) -> list[str]:
  """The config paths outside FUSED_FIELDS whose values differ between `configs`."""
  flats = [_flatten(c.to_dict()) for c in configs]
  keys = sorted(set().union(*flats))
  return [k for k in keys if k not in FUSED_FIELDS
          and len({json.dumps(f.get(k), default=str) for f in flats}) > 1]


def hparams(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
  """{name: [M] float32} of FUSED_FIELDS, named by their last part ('gamma', 'base_lr')."""
  return {path.split('.')[-1]: np.asarray([float(c[path.split('.')[0]][path.split('.')[1]])
                                           for c in configs], np.float32)
          for path in FUSED_FIELDS}


def make_mesh(config: ml_collections.ConfigDict, num_members: int, devices=None):
  """The fused mesh: members over 'sweep' (config.mesh.sweep_parallelism), each member's batch
  over 'data'."""
  devices = jax.devices() if devices is None else devices
  sizes.check_mesh(config, len(devices), members=num_members)
  return sharding_lib.make_mesh(config, devices, sweep=config.mesh.sweep_parallelism)


def make_train_step(config: ml_collections.ConfigDict, model, mesh):
  """The jitted fused step (states [M, ...], batch, hparams {name: [M]}) -> (states [M, ...],
  metrics {name: [M]}); each member builds its own optimiser from its traced numbers (the
  optimiser state's layout does not depend on them), the batch is shared, the states donated."""

  def member_step(state, batch, member_hparams):
    tx = optim.make_optimizer(config, state.params, member_hparams)
    return train.train_step(state, batch, model=model, config=config, tx=tx,
                            hparams=member_hparams)

  stacked = sharding_lib.member_sharding(mesh)
  # spmd_axis_name: the model's own sharding constraints (spatial partitioning) then keep the
  # member axis split over 'sweep' too.
  sweep_axis = sharding_lib.SWEEP_AXIS if sharding_lib.SWEEP_AXIS in mesh.axis_names else None
  return jax.jit(jax.vmap(member_step, in_axes=(0, None, 0), spmd_axis_name=sweep_axis),
                 in_shardings=(stacked, sharding_lib.batch_sharding(mesh), stacked),
                 out_shardings=(stacked, stacked), donate_argnums=(0,))


def abstract_states(config: ml_collections.ConfigDict, model, mesh, num_members: int) -> Any:
  """Shapes, dtypes and shardings of the stacked state [M, ...] that `train_and_evaluate` builds
  (`stack` of the members' states), without computing it (for ahead-of-time compiles)."""
  state, _ = train.abstract_train_state(config, model, mesh)
  stacked = jax.eval_shape(lambda s: jax.tree.map(lambda x: jnp.stack([x] * num_members), s),
                           state)
  sharding = sharding_lib.member_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      stacked)


def abstract_hparams(num_members: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The `hparams` argument of the fused step as abstract arrays [M], laid out as the run's."""
  sharding = sharding_lib.member_sharding(mesh)
  return {path.split('.')[-1]: jax.ShapeDtypeStruct((num_members,), jnp.float32,
                                                   sharding=sharding)
          for path in FUSED_FIELDS}


def stack(states: Sequence[Any], mesh) -> Any:
  """Member states -> one state with a leading member axis."""
  return jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                 out_shardings=sharding_lib.member_sharding(mesh))(*states)


def member(states: Any, m: int) -> Any:
  """Member `m`'s state, laid out as a separate run's (replicated over the mesh)."""
  return _take(jax.tree.leaves(states)[0].sharding.mesh)(states, np.int32(m))


@functools.lru_cache(maxsize=4)
def _take(mesh):
  # One program for every member and every save: sliced leaf by leaf outside jit, each leaf's
  # shape compiled a program of its own, seconds per save on a CPU.
  return jax.jit(lambda states, m: jax.tree.map(lambda x: x[m], states),
                 out_shardings=sharding_lib.replicated(mesh))


def fetch(tree: Any) -> Any:
  """`tree`'s arrays as numpy on this host, also those split over hosts (a member axis over a
  'sweep' axis across hosts, which `jax.device_get` cannot read)."""
  return multihost_utils.process_allgather(tree, tiled=True)


def agreed(values: Sequence[int]) -> list[int]:
  """Process 0's `values` (as many ints on every process) on every process: what one host reads
  from the workdirs (a finished member, a checkpoint's step) may differ on another while a file
  is being written, and every host must build the same programs."""
  if jax.process_count() == 1 or not values:
    return [int(v) for v in values]
  return [int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))]


class _Member:
  """One member's config, workdir and writers."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.name = fileio.Path(workdir).name
    self.manager = ckpt.make_manager(workdir, config.keep_checkpoints)
    self.best_manager = (ckpt.make_best_manager(workdir, config.keep_best_by)
                         if config.keep_best_by else None)
    self.logger = None
    self.stopped_at = None  # Step whose loss or gradient was non-finite.


def train_and_evaluate(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]
                       ) -> list[dict[str, Any] | None]:
  """Trains one fused group side by side (resuming from their checkpoints, which must all be at
  the same step) and evaluates every member, as `train.train_and_evaluate` does each.

  Returns:
    Each member's final evaluation metrics, or None for a member stopped by a non-finite loss.
  Raises:
    ValueError naming the fields when the configs cannot be fused; run_control.Preempted.
  """
  fields = unfusable_fields(configs)
  if fields:
    raise ValueError(f'These members cannot be trained in one program: they differ in '
                     f"{', '.join('config.' + f for f in fields)}")
  for config, workdir in zip(configs, workdirs):
    train.validate_config(config)
    run_control.make_writable_workdir(workdir)
  mesh = make_mesh(configs[0], len(configs))
  sizes.check_batch('config.batch_size', configs[0].batch_size,
                    mesh.shape[sharding_lib.DATA_AXIS], jax.process_count())
  # The rows of each batch this host loads: its part of the batch, or all of it where the
  # members are split over the hosts and every host holds each member's whole batch.
  rows, row_blocks = sharding_lib.host_rows(mesh, configs[0].batch_size)
  source = pipeline.create_source(configs[0].data, configs[0].data.train_split)
  members = [_Member(train.with_categories(c, source.categories), w)
             for c, w in zip(configs, workdirs)]
  config = members[0].config
  # Evaluation runs one member at a time on a separate run's mesh (every device over 'data'),
  # with a separate run's eval batches on each host.
  eval_mesh = sharding_lib.make_mesh(config)
  model = models.create_model(config, mesh)
  resume = {m.manager.latest_step() for m in members}
  if len(resume) > 1:
    raise ValueError(f'Fused members resume from one step; their checkpoints are at steps '
                     f'{sorted(resume, key=str)}')
  fresh = resume == {None}
  state, _ = train.create_train_state(config, model, mesh, pretrained=fresh)
  if not fresh:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = [ckpt.restore_latest(m.manager, abstract) for m in members]
    state = stack(restored, mesh)
  else:
    state = stack([state] * len(members), mesh)
  for m in members:
    train.write_config(m.config, m.workdir)
  start_step = int(fetch(state.step)[0])
  total = config.num_train_steps
  logging.info('Fused sweep of %d members starting at step %d of %d (%s): %s', len(members),
               start_step, total, 'fresh' if fresh else 'resumed',
               ', '.join(m.name for m in members))
  step_fn = make_train_step(config, model, mesh)
  numbers = jax.device_put(hparams([m.config for m in members]),
                           sharding_lib.member_sharding(mesh))
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed,
                                process_index=rows, process_count=row_blocks)
  for m in members:
    m.logger = metrics_lib.MetricLogger(m.workdir, resume_step=start_step)
  preemption = run_control.Preemption()
  clock = run_control.StepClock(start_step)
  active = lambda: [(i, m) for i, m in enumerate(members) if m.stopped_at is None]

  def stop_non_finite(step):
    """Stops the members whose state recorded a non-finite step (a host sync)."""
    bad = fetch(state.first_bad_step)
    for i, m in active():
      if bad[i] >= 0:
        m.stopped_at = int(bad[i]) + 1
        m.logger.write(m.stopped_at, {'non_finite_step': m.stopped_at}, prefix='stopped')
        logging.error('Member %s: non-finite loss or gradient at step %d; its updates are '
                      'masked from then on and its last good checkpoint is step %s in %s. The '
                      'other members go on.', m.name, m.stopped_at, m.manager.latest_step(),
                      m.workdir)
    if not active():
      raise run_control.NonFiniteError(f'Every member of the fused sweep stopped on a '
                                       f'non-finite loss or gradient (by step {step}).')

  def save(step, force=False):
    stop_non_finite(step)
    for i, m in active():
      ckpt.save(m.manager, member(state, i), force=force)

  def evaluate(step):
    for i, m in active():
      # The group's config, not the member's: members differ only in FUSED_FIELDS, which
      # evaluation does not read, so every member reuses one compiled detector (cached by
      # config) instead of compiling its own.
      results[i] = train.evaluate_and_log(config, member(state, i), step, workdir=m.workdir,
                                          mesh=eval_mesh, logger=m.logger,
                                          best_manager=m.best_manager)

  results: list[dict[str, Any] | None] = [None] * len(members)
  pending: list[dict[str, jax.Array]] = []
  compiled = set()
  try:
    batches = loader.iterate(start_step)
    for step in range(start_step + 1, total + 1):
      host_batch = next(batches)
      canvas = host_batch['image'].shape[1:3]
      if canvas not in compiled:
        logging.info('Compiling the fused train step (%d members) for %dx%d images.',
                     len(members), *canvas)
      state, metrics = step_fn(state, sharding_lib.to_global(train.train_inputs(host_batch),
                                                             mesh), numbers)
      pending.append(metrics)
      if canvas not in compiled:
        compiled.add(canvas)
        jax.block_until_ready(metrics)
        clock.start(step)
      if preemption.reached(step):
        save(step, force=True)
        for m in members:
          ckpt.wait_until_saved(m.manager)
        raise run_control.Preempted(step, ', '.join(m.workdir for m in members))
      if run_control.itstime(step, config.log_every_steps, total):
        stop_non_finite(step)
        window = fetch(pending)  # [steps] of {name: [M]}.
        pending = []
        per_step = clock.lap(step)
        for i, m in active():
          summary = {k: float(np.mean([w[k][i] for w in window])) for k in window[0]}
          if per_step is not None:
            summary['images_per_second'] = config.batch_size / per_step
          m.logger.write(step, summary)
          logging.info('step %d/%d  %s  loss %.4f (cls %.4f box %.4f)  lr %.3g', step, total,
                       m.name, summary['loss'], summary['cls_loss'], summary['box_loss'],
                       summary['learning_rate'])
        if per_step is not None:
          logging.info('step %d/%d  %.1f img/s per member, %d members, ETA %s', step, total,
                       config.batch_size / per_step, len(active()),
                       run_control.format_eta(per_step * (total - step)))
      if (run_control.itstime(step, config.checkpoint_every_steps, total)
          or run_control.itstime(step, config.eval_every_steps, total)):
        save(step)
      if run_control.itstime(step, config.eval_every_steps, total, last=False):
        evaluate(step)
        clock.start(step)
    stop_non_finite(total)
    evaluate(max(start_step, total))
  finally:
    for m in members:
      ckpt.wait_until_saved(m.manager)
      if m.logger is not None:
        m.logger.close()
  return results


def plan(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str] | None = None
         ) -> tuple[list[list[int]], str]:
  """Splits a sweep into fusable groups (member indices, in sweep order) and says why in one
  line: by the fields outside FUSED_FIELDS that differ, and by the step each member's newest
  checkpoint resumes at (one input stream starts at one step). workdirs=None: every member
  starts afresh (a plan made before any run, tools/pod_plan --sweep)."""
  groups: dict[tuple[str, Any], list[int]] = {}
  if workdirs is None:
    latest = [None] * len(configs)
  else:
    found = [_latest_step(w) for w in workdirs]
    latest = [None if s < 0 else s for s in agreed([-1 if s is None else s for s in found])]
  for i, (config, step) in enumerate(zip(configs, latest)):
    key = (_structure_key(config), step)
    groups.setdefault(key, []).append(i)
  fields = unfusable_fields(configs)
  steps = sorted({k[1] for k in groups}, key=lambda s: -1 if s is None else s)
  reasons = ([f"they differ in {', '.join('config.' + f for f in fields)}"] if fields else [])
  if len(steps) > 1:
    reasons.append('their checkpoints resume at different steps '
                   f"({', '.join('none' if s is None else str(s) for s in steps)})")
  if len(groups) == 1:
    return list(groups.values()), f'{len(configs)} members fused in one program'
  return list(groups.values()), (f'{len(configs)} members split into {len(groups)} fused '
                                 f"groups, one after another, as {' and '.join(reasons)}")


def _latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in `workdir` (None without one)."""
  directory = ckpt.checkpoint_dir(workdir)
  if not directory.exists():
    return None
  return ckpt.make_manager(workdir, 1).latest_step()


SUMMARY_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def summary_table(names: Sequence[str], results: Sequence[dict[str, Any] | None],
                  notes: Sequence[str]) -> str:
  """A Markdown table of each member's COCO AP numbers (in points) and a note."""
  head = ['member', *SUMMARY_METRICS, 'note']
  rows = [head, ['---'] * len(head)]
  for name, result, note in zip(names, results, notes):
    values = [f'{100 * result[k]:.1f}' if result and k in result else '-'
              for k in SUMMARY_METRICS]
    rows.append([name, *values, note])
  return '\n'.join('| ' + ' | '.join(r) + ' |' for r in rows)


def run_sweep(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
              summary_dir: str, skip: Sequence[bool] = ()) -> list[dict[str, Any] | None]:
  """Trains and evaluates a whole sweep, fused where `plan` allows, then prints the AP table
  and writes it to `summary_dir` (summary.md, and summary.json by member name).

  skip: per member, True for one that is finished already (its metrics_<split>.json is read
  for the table); the same on every process (scripts/sweep.py takes process 0's, `agreed`).
  """
  skip = list(skip) or [False] * len(configs)
  todo = [i for i in range(len(configs)) if not skip[i]]
  results: list[dict[str, Any] | None] = [None] * len(configs)
  notes = ['finished before: skipped' if s else '' for s in skip]
  for i in range(len(configs)):
    if skip[i]:
      results[i] = _read_metrics(configs[i], workdirs[i])
  if todo:
    groups, why = plan([configs[i] for i in todo], [workdirs[i] for i in todo])
    logging.info('Fused sweep: %s.', why)
    for g, indices in enumerate(groups):
      indices = [todo[j] for j in indices]
      logging.info('Fused group %d of %d: %s', g + 1, len(groups),
                   ', '.join(fileio.Path(workdirs[i]).name for i in indices))
      group_results = train_and_evaluate([configs[i] for i in indices],
                                         [workdirs[i] for i in indices])
      for i, result in zip(indices, group_results):
        results[i] = result
        if result is None:
          notes[i] = 'stopped: non-finite loss (see its metrics.jsonl)'
  names = [fileio.Path(w).name for w in workdirs]
  table = summary_table(names, results, notes)
  if jax.process_index() == 0:
    out = fileio.Path(summary_dir)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_atomic(out / 'summary.md', table + '\n')
    fileio.write_atomic(out / 'summary.json', json.dumps(
        {n: {'metrics': r, 'note': note, 'workdir': w}
         for n, r, note, w in zip(names, results, notes, workdirs)}, indent=2))
    print(f'Sweep summary (COCO AP in points, written to {out / "summary.md"}):\n{table}',
          flush=True)
  return results


def _read_metrics(config, workdir) -> dict[str, Any] | None:
  path = fileio.Path(workdir) / f'metrics_{config.data.eval_split}.json'
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None

