"""Training metrics: JSON lines (`metrics.jsonl`) and TensorBoard events of one workdir."""

import json
import math

import jax

from retina_jax import fileio


class MetricLogger:
  """Metrics as JSON lines (`metrics.jsonl`) and TensorBoard events, written by host 0 only.

  metrics.jsonl is rewritten whole at each write (`fileio.write_atomic`): an object store has
  no append, and a reader or a kill then sees the file before or after a record, never half a
  line. TensorBoard events go through tensorboardX, which writes gs:// with
  google-cloud-storage (re-uploading its event file at each flush).

  Resuming at `resume_step` first drops what a killed run logged after its last checkpoint:
  the records past that step from metrics.jsonl (and a line cut short by an older writer), and,
  by TensorBoard's purge_step, its events, so that every step appears once in both.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._path = fileio.Path(workdir) / 'metrics.jsonl'
    self._lines = _records_up_to(self._path, resume_step if resume_step > 0 else None)
    from tensorboardX import SummaryWriter  # Imported lazily: it pulls in protobuf.
    self._tb = SummaryWriter(str(fileio.Path(workdir) / 'tensorboard'),
                             purge_step=resume_step + 1 if resume_step > 0 else None)

  def write(self, step: int, metrics: dict[str, float], prefix: str = 'train'):
    if not self._active:
      return
    record = {'step': step, **{f'{prefix}/{k}': float(v) for k, v in metrics.items()}}
    self._lines.append(json.dumps(record) + '\n')
    fileio.write_atomic(self._path, ''.join(self._lines))
    for key, value in record.items():
      if key != 'step' and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self):
    if self._active:
      self._tb.close()


def _records_up_to(path, step: int | None) -> list[str]:
  """The lines of a metrics.jsonl with the records up to `step` (all when None), without a line
  that an appending writer (before `write_atomic`) left cut short."""
  if not path.exists():
    return []
  keep = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and (step is None or record.get('step', 0) <= step):
      keep.append(json.dumps(record) + '\n')
  return keep
