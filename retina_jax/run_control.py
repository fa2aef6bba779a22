"""What decides when a training run acts and how it stops: the periodic-action rule (`itstime`),
the step clock behind images/s and the ETA, preemption, the workdir probe at start-up, and the
errors that end a run with a message saying what to do (hosts.run maps them to exit codes)."""

import signal
import time

import jax
from jax.experimental import multihost_utils

from retina_jax import fileio


def itstime(step: int, every: int, total: int, *, last: bool = True) -> bool:
  """Whether a periodic action (log, checkpoint, evaluation) is due after `step` of `total`:
  every `every` steps (a period of 0 means never in between, as config.eval_every_steps in the
  demo) and, at the last step, exactly when `last` (False for an action that runs after the
  loop instead)."""
  if step == total:
    return last
  return every > 0 and step % every == 0


class StepClock:
  """Seconds per step since the clock last started, so that compilation and evaluation, which
  the loop starts the clock after, count in neither images/s nor the ETA."""

  def __init__(self, step: int):
    self.start(step)

  def start(self, step: int):
    self._step, self._time = step, time.perf_counter()

  def lap(self, step: int) -> float | None:
    """Seconds per step from the start to `step` (None when no step ran), and starts again."""
    now = time.perf_counter()
    per_step = (now - self._time) / (step - self._step) if step > self._step else None
    self._step, self._time = step, now
    return per_step


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Preemption:
  """SIGTERM on any host asks every host to save and stop at the same step."""

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


class Preempted(Exception):
  """Training stopped early on a preemption request, after the checkpoint of `step` was saved
  on every host; re-running the same command resumes there (hosts.run exits 143 for it)."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f'Preempted: saved step {step} in {workdir}; re-run the same command to '
                     'resume.')
    self.step = step


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient stopped training; no checkpoint holds a state after it."""


class EvaluationError(RuntimeError):
  """An evaluation during training failed; the checkpoint of its step is saved."""


class WorkdirError(OSError):
  """--workdir cannot be written."""


def make_writable_workdir(workdir: str):
  """Creates `workdir` and writes and removes one small file there (one per process), so that a
  read-only or full workdir stops at start-up, naming it, rather than at the first save."""
  path = fileio.Path(workdir)
  probe = path / f'.write_probe.{jax.process_index()}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('retina_jax')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'Cannot write to --workdir {workdir} ({e.strerror or e}): make it '
                       'writable or free space on it, or pass another --workdir.') from e

