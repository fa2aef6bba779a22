"""Orbax checkpoints of the whole train state, and restoring parameters for evaluation.

Layout: `<workdir>/checkpoints/<step>/` holds one pytree {step, params, batch_stats, opt_state,
first_bad_step}; with config.keep_best_by, `<workdir>/checkpoint_best/<step>/` holds the model
variables {params, batch_stats} of the evaluation with the highest value of that metric (as
detectron2's BestCheckpointer), whatever the newest checkpoints are. The data position is a
pure function of (seed, step) (see `retina_jax.data.sampler`), so the step restores it too: a
resumed run sees exactly the examples an uninterrupted one would. Restoring takes the target
shardings from the current mesh, so a checkpoint written on N devices restores on any other
number.
"""

import logging
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from retina_jax import fileio


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints, made absolute for local paths (orbax refuses relative ones, and
  `make demo` passes workdirs/demo); gs:// and other URLs are kept as they are."""
  return fileio.Path(fileio.absolute(workdir)) / 'checkpoints'


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class CheckpointWriteError(OSError):
  pass


BEST = 'best'  # --checkpoint=best in evaluate and export.


def parse_checkpoint_flag(value: str) -> int | str | None:
  """--checkpoint's value (`cli.define_checkpoint_flag`) -> `restore_variables`'s `step`."""
  if value in ('', 'latest'):
    return None
  if value == BEST:
    return BEST
  if value.isdigit():
    return int(value)
  raise ValueError(f"--checkpoint={value!r}: give 'latest', 'best' or a step number.")


def best_dir(workdir: str) -> epath.Path:
  return checkpoint_dir(workdir).parent / 'checkpoint_best'


def make_best_manager(workdir: str, metric: str) -> ocp.CheckpointManager:
  """The one checkpoint with the highest `metric`; its value is stored with it, so a resumed
  run still compares against the best of the runs before."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m[metric], best_mode='max', create=True,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(best_dir(workdir), options=options)


def save_if_best(manager: ocp.CheckpointManager, metric: str, value: float, state: Any) -> bool:
  """Saves state's model variables when `value` beats the kept best (ties keep the earlier)."""
  best = manager.best_step()
  if best is not None and not value > manager.metrics(best)[metric]:
    return False
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(variables),
                      metrics={metric: float(value)}, force=True)


def save(manager: ocp.CheckpointManager, state: Any, force: bool = False) -> bool:
  """Starts writing `state` in the background (after the previous save finished: its failure
  is raised here)."""
  step = int(jax.device_get(state.step))
  try:
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)
  except Exception as e:  # pylint: disable=broad-except
    raise _write_failed(manager, e) from e


def wait_until_saved(manager: ocp.CheckpointManager):
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_failed(manager, e) from e


def _write_failed(manager: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
  """One line for a failed write (a full disk, lost permissions) naming where and what is left:
  orbax writes into a temporary folder, so the checkpoints before it are intact."""
  try:
    manager.reload()  # Orbax's own view of what is complete (commit_success.txt on gs://).
    newest = manager.latest_step()
  except Exception:  # pylint: disable=broad-except
    newest = None
  return CheckpointWriteError(
      f'Could not write a checkpoint in {manager.directory}: {_first_line(error)}. '
      + (f'The newest intact one is step {newest}' if newest is not None else
         'No checkpoint is saved')
      + '; free space or fix permissions there, then re-run to resume.')


def _name(path: tuple) -> str:
  """'opt_state/inner_states/train/0/trace/conv/kernel' for a key path of the state or of its
  saved metadata (attributes there are dict keys)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(path): tuple(leaf.shape) for path, leaf in leaves}


def _first_mismatch(saved: Any, abstract_state: Any) -> str:
  """'params/x/kernel: (3, 3, 64, 64) saved, (3, 3, 32, 32) now' for the first array of the
  saved tree (its orbax metadata) whose shape differs from `abstract_state`'s, or that only one
  side has; model variables first, for the clearest message."""
  theirs, ours = _shapes_by_name(saved), _shapes_by_name(abstract_state)
  model_first = lambda k: (not k.startswith(('params/', 'batch_stats/')), k)
  for key in sorted(set(ours) | set(theirs), key=model_first):
    old, new = theirs.get(key), ours.get(key)
    if old != new:
      describe = lambda x: 'absent' if x is None else str(x)
      return f'{key}: {describe(old)} saved, {describe(new)} now'
  return ''


def _first_line(error: BaseException) -> str:
  """What is wrong, in one line: the root cause (orbax wraps TensorStore's errors, which name
  the file, in pages of its spec), first line only."""
  while error.__cause__ is not None:
    error = error.__cause__
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _readable_metadata(step_dir: epath.Path) -> Any:
  """The saved tree's array metadata; raises if the checkpoint cannot be read."""
  return ocp.PyTreeCheckpointer().metadata(step_dir / 'default').item_metadata.tree


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest readable checkpoint laid out like `abstract_state` (shapes and shardings).

  A checkpoint written under another config (another model size, norm or optimiser) stops with
  the first array that differs and what to do, instead of orbax's error about one array. A
  damaged one (a file truncated or deleted) is moved aside to `<step>.damaged`, with one
  warning line naming it and the step resumed from instead; when no checkpoint is readable,
  all stay where they are and it stops with their paths.
  """
  directory = fileio.Path(manager.directory)
  damaged = []  # (step, why), newest first.
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      mismatch = _first_mismatch(_readable_metadata(directory / str(step)), abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      damaged.append((step, _first_line(e)))
      continue
    if mismatch:
      raise ValueError(
          f'Checkpoint {step} in {directory} does not fit the train state of this config '
          f'({mismatch}): it was written under another config (model shape, norm or optimiser). '
          'Re-run with the config that wrote it (config.json beside checkpoints/), or train in a '
          'new --workdir.')
    try:
      # The tree fits, so whatever fails now is in the files: TensorStore raises plain
      # Exceptions for a truncated or missing array file.
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      damaged.append((step, _first_line(e)))
      continue
    if damaged:
      _set_aside(manager, damaged, step)
    return restored
  if damaged:
    raise _unreadable(directory, damaged)
  return None


class DamagedCheckpointError(RuntimeError):
  pass


def _unreadable(directory: epath.Path, damaged: list[tuple[int, str]]) -> DamagedCheckpointError:
  return DamagedCheckpointError(
      f'No readable checkpoint in {directory}: '
      + '; '.join(f'step {s} at {directory / str(s)}: {why}' for s, why in damaged)
      + '. Put back an intact copy of one, or move checkpoints/ away to train afresh.')


def _set_aside(manager: ocp.CheckpointManager, damaged: list[tuple[int, str]], resumed: int):
  """Renames damaged step folders to `<step>.damaged` (kept for inspection; orbax no longer
  sees them, so the step can be saved again), on host 0, with one warning line for each."""
  directory = fileio.Path(manager.directory)
  for step, why in damaged:
    path = directory / str(step)
    if jax.process_index() == 0:
      path.rename(directory / f'{step}.damaged')
    logging.warning('Checkpoint step %d at %s is damaged (%s): moved it to %s.damaged and '
                    'resuming from step %d.', step, path, why, path, resumed)
  multihost_utils.sync_global_devices('retina_jax: damaged checkpoints set aside')
  manager.reload()


def restore_variables(workdir: str, step: int | str | None = None
                      ) -> tuple[dict[str, Any], int]:
  """Model variables {'params', 'batch_stats'} of the newest readable checkpoint, on host;
  skipping a damaged newest one says so in one warning line. `step` picks another: a step
  number, or 'best' for the one kept by config.keep_best_by.

  Reads only the parameter subtrees, never the optimiser state, and needs no train state or
  mesh, so evaluation and export run on any device count.
  """
  best = step == BEST
  directory = best_dir(workdir) if best else checkpoint_dir(workdir)
  if best or step is None:
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    steps = sorted(manager.all_steps(), reverse=True)
  else:
    steps = [step]
  if not steps:
    raise FileNotFoundError(
        f'No best checkpoint in {directory}: only training with config.keep_best_by set (e.g. '
        "'AP') and evaluations during training (config.eval_every_steps) keeps one."
        if best else
        f'No checkpoint in {directory}: train first (python -m retina_jax.main --workdir '
        f'{workdir} ...) or pass exported parameters with --params.')
  damaged = []
  for s in steps:
    try:
      variables = _read_variables(directory / str(s) / 'default')
    except Exception as e:  # pylint: disable=broad-except
      damaged.append((s, _first_line(e)))
      continue
    for bad, why in damaged:
      logging.warning('Checkpoint step %d at %s is damaged (%s): reading step %d instead.', bad,
                      directory / str(bad), why, s)
    return variables, s
  raise _unreadable(directory, damaged)


def _read_variables(path: epath.Path) -> dict[str, Any]:
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  wanted = {k: tree[k] for k in ('params', 'batch_stats')}
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=wanted,
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
      partial_restore=True))
