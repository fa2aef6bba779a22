"""COCO metrics of training's evaluations, computed on the host while the devices train on.

At an evaluation step the loop runs the detector (the devices and collectives:
`evaluator.detect_split`) and hands the gathered detections to `BackgroundMetrics.submit`. A
thread scores them (`evaluator.score`: host work only, no collective, so nothing it does can
interleave with the train step's collectives differently on different hosts). The metric is
finished, which gathers the hosts' shares (a collective), at a point every host reaches at the
same step: a log step at which every host's thread is done (`poll`), the next evaluation, or
the end of the run (`wait`). Finishing hands the numbers, with the step they belong to, to
`on_metrics` (log, best checkpoint, table).

Preemption: until its metric is finished, an evaluation's detections are kept in
`<workdir>/pending_eval/<step>.npz` (written before the thread starts, removed once
`on_metrics` returned). A resumed run (`redo`) scores again those at or before its checkpoint
step whose numbers the metrics log does not hold, and drops those past it (training redoes
those steps and their evaluations): every metric is logged once, none is lost.
"""

import io
import threading
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from retina_jax import fileio
from retina_jax.evaluation import evaluator

PENDING = 'pending_eval'


def pending_dir(workdir: str) -> fileio.Path:
  return fileio.Path(workdir) / PENDING


class _Job:
  """One evaluation's metric: the thread scoring it and what finishing it needs."""

  def __init__(self, step: int, detections: evaluator.Detections, variables: Any, workdir: str):
    self.step, self.detections, self.variables = step, detections, variables
    self.share, self.error = None, None
    self.thread = threading.Thread(target=self._run, args=(workdir,), daemon=True,
                                   name=f'coco-metric-step-{step}')
    self.thread.start()

  def _run(self, workdir: str):
    try:
      self.share = evaluator.score(self.detections, workdir)
    except Exception as e:  # pylint: disable=broad-except
      self.error = e  # Raised by the loop's thread when it finishes the job.


class BackgroundMetrics:
  """At most one metric in flight; its detections kept in the workdir until it is logged.

  on_metrics(step, metrics, variables): called in the loop's thread, on every host, with the
    numbers of the evaluation at `step` and the variables given to `submit` (None when none).
  on_error(step, exception) -> the exception to raise when scoring or finishing failed.
  """

  def __init__(self, workdir: str, on_metrics: Callable[[int, dict, Any], None],
               on_error: Callable[[int, BaseException], BaseException]):
    self._workdir = workdir
    self._on_metrics, self._on_error = on_metrics, on_error
    self._job: _Job | None = None

  @property
  def pending_step(self) -> int | None:
    return None if self._job is None else self._job.step

  def submit(self, step: int, detections: evaluator.Detections, variables: Any = None,
             keep: bool = True):
    """Starts scoring `detections` of the evaluation at `step` (the previous metric is
    finished first). keep=False: its detections are in the workdir already (a redo)."""
    self.wait()
    if keep and jax.process_index() == 0:
      _write_pending(self._workdir, step, detections)
    self._job = _Job(step, detections, variables, self._workdir)

  def poll(self):
    """Finishes the metric in flight if every host's thread is done; every host calls it at
    the same steps (a collective on several hosts)."""
    if self._job is None:
      return
    done = not self._job.thread.is_alive()
    if jax.process_count() > 1:
      done = bool(np.min(multihost_utils.process_allgather(np.int32(done))))
    if done:
      self.wait()

  def wait(self):
    """Finishes the metric in flight, waiting for its thread."""
    job, self._job = self._job, None
    if job is None:
      return
    job.thread.join()
    try:
      if job.error is not None:
        raise job.error
      metrics = evaluator.finish(job.detections, job.share, self._workdir)
    except Exception as e:  # pylint: disable=broad-except
      raise self._on_error(job.step, e) from e
    self._on_metrics(job.step, metrics, job.variables)
    if jax.process_index() == 0:
      _pending_path(self._workdir, job.step).unlink(missing_ok=True)

  def redo(self, resume_step: int, logged_steps: set[int], gt_of_split: Callable[[str], dict],
           variables_of_step: Callable[[int], Any]):
    """After a resume at `resume_step`: scores again, in the background, each kept evaluation
    at or before it whose step is not in `logged_steps`; removes the others.

    gt_of_split(split): the COCO ground truth the detections were scored against.
    variables_of_step(step): what `on_metrics` gets as variables for a redone metric.
    """
    folder = pending_dir(self._workdir)
    steps = sorted(int(p.name[:-len('.npz')]) for p in folder.glob('*.npz')) if (
        folder.exists()) else []
    if jax.process_count() > 1:  # Every host has listed them before any is removed.
      multihost_utils.sync_global_devices('retina_jax: pending evaluations listed')
    for step in steps:
      if step > resume_step or step in logged_steps:
        if jax.process_index() == 0:
          _pending_path(self._workdir, step).unlink(missing_ok=True)
        continue
      logging.info('The metric of the evaluation at step %d was not finished before the run '
                   'stopped: scoring its kept detections again.', step)
      detections = _read_pending(self._workdir, step, gt_of_split)
      self.submit(step, detections, variables_of_step(step), keep=False)


_FIELDS = ('image_id', 'example_valid', 'boxes', 'scores', 'labels', 'valid')


def _pending_path(workdir: str, step: int) -> fileio.Path:
  return pending_dir(workdir) / f'{step}.npz'


def _write_pending(workdir: str, step: int, d: evaluator.Detections):
  buf = io.BytesIO()
  np.savez(buf, split=np.asarray(d.split), category_ids=np.asarray(d.category_ids, np.int64),
           **{k: np.asarray(d.dets[k]) for k in _FIELDS})
  pending_dir(workdir).mkdir(parents=True, exist_ok=True)
  fileio.write_atomic(_pending_path(workdir, step), buf.getvalue())


def _read_pending(workdir: str, step: int, gt_of_split: Callable[[str], dict]
                  ) -> evaluator.Detections:
  with np.load(io.BytesIO(_pending_path(workdir, step).read_bytes())) as z:
    split = str(z['split'])
    dets = {k: z[k] for k in _FIELDS}
    return evaluator.Detections(split, gt_of_split(split), dets, z['category_ids'].tolist())
