"""Orbax checkpoints of the whole train state, and restoring parameters for evaluation.

Layout: `<workdir>/checkpoints/<step>/` holds one pytree {step, params, batch_stats, opt_state,
first_bad_step}. The data position is a pure function of (seed, step) (see
`retina_jax.data.pipeline`), so the step restores it too: a resumed run sees exactly the
examples an uninterrupted one would. Restoring takes the target shardings from the current
mesh, so a checkpoint written on N devices restores on any other number.
"""

from typing import Any

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def checkpoint_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints, made absolute for local paths (orbax refuses relative ones, and
  `make demo` passes workdirs/demo); gs:// and other URLs are kept as they are."""
  path = epath.Path(workdir)
  if '://' not in str(workdir):
    path = path.resolve()
  return path / 'checkpoints'


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: Any, force: bool = False) -> bool:
  step = int(jax.device_get(state.step))
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def _first_mismatch(path: epath.Path, abstract_state: Any) -> str:
  """'params/x/kernel: (3, 3, 64, 64) saved, (3, 3, 32, 32) now' for the first model variable
  whose saved shape differs from `abstract_state`'s, or whatever is missing on either side."""
  try:
    saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  except Exception:  # pylint: disable=broad-except
    return ''  # Unreadable metadata: the restore error is all there is to say.
  for collection in ('params', 'batch_stats'):
    ours = traverse_util.flatten_dict(getattr(abstract_state, collection, {}), sep='/')
    theirs = traverse_util.flatten_dict(saved.get(collection) or {}, sep='/')
    for key in sorted(set(ours) | set(theirs)):
      old, new = theirs.get(key), ours.get(key)
      if old is None or new is None or tuple(old.shape) != tuple(new.shape):
        describe = lambda x: 'absent' if x is None else str(tuple(x.shape))
        return f'{collection}/{key}: {describe(old)} saved, {describe(new)} now'
  return ''


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest complete checkpoint laid out like `abstract_state` (shapes and shardings).

  A checkpoint written under another config (another model size, norm or optimiser) stops with
  the first variable that differs and what to do, instead of orbax's error about one array.
  """
  step = manager.latest_step()
  if step is None:
    return None
  def does_not_fit(why: str) -> ValueError:
    return ValueError(
        f'Checkpoint {step} in {manager.directory} does not fit the train state of this config '
        f'({why}): it was written under another config (model shape, norm or optimiser). '
        'Re-run with the config that wrote it (config.json beside checkpoints/), or train in a '
        'new --workdir.')

  mismatch = _first_mismatch(epath.Path(manager.directory) / str(step) / 'default',
                             abstract_state)
  if mismatch:
    raise does_not_fit(mismatch)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:  # E.g. another optimiser's state.
    raise does_not_fit((str(e).strip().splitlines() or [type(e).__name__])[0]) from e


def restore_variables(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """Model variables {'params', 'batch_stats'} of the newest (or given) checkpoint, on host.

  Reads only the parameter subtrees, never the optimiser state, and needs no train state or
  mesh, so evaluation and export run on any device count.
  """
  directory = checkpoint_dir(workdir)
  if step is None:
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'No checkpoint in {directory}: train first (python -m retina_jax.main --workdir '
        f'{workdir} ...) or pass exported parameters with --params.')
  path = directory / str(step) / 'default'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  wanted = {k: tree[k] for k in ('params', 'batch_stats')}
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=wanted,
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
      partial_restore=True))
  return restored, step
