"""Metrics logging: a killed and resumed run reads back every step once, on local disk and on
gs:// (the GCS emulator), at a cost per log that does not grow with the run."""

import os
import struct
import sys

import pytest

from retina_jax import fileio
from retina_jax import metrics as metrics_lib
from tests import gcs_emulator


def _log(logger, steps, written):
  for step in steps:
    logger.write(step, {'loss': 1.0 / step})
    written.append(step)
    if step == 3:
      logger.write(step, {'AP': 0.5}, prefix='eval')


def _killed_and_resumed(workdir, per_chunk, written):
  """Steps 1-7 logged, the process dies without closing; the run resumes at step 4 and logs
  5-9 (the evaluation record of step 3 stays)."""
  _log(metrics_lib.MetricLogger(workdir, records_per_chunk=per_chunk), range(1, 8), written)
  resumed = metrics_lib.MetricLogger(workdir, resume_step=4, records_per_chunk=per_chunk)
  _log(resumed, range(5, 10), written)
  resumed.close()


def _train_steps(records):
  return [r['step'] for r in records if 'train/loss' in r]


def _events(data: bytes) -> list:
  """The events of one event file, decoded with tensorboardX's copy of TensorBoard's protocol
  buffers; every record's CRCs are checked."""
  with pytest.MonkeyPatch.context() as mp:
    if 'tensorboardX' not in sys.modules and 'torch' not in sys.modules:
      mp.setitem(sys.modules, 'torch', None)  # tensorboardX would import it (5 s), unused here.
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack('<Q', header)
    body = data[offset + 12:offset + 12 + length]
    assert data[offset + 8:offset + 12] == metrics_lib._masked_crc(header)
    assert data[offset + 12 + length:offset + 16 + length] == metrics_lib._masked_crc(body)
    events.append(event_pb2.Event.FromString(body))
    offset += 16 + length
  return events


def _event_steps(files: list[bytes]) -> list[int]:
  """The steps of train/loss that TensorBoard shows from these event files (in name order): a
  session start at step s hides the earlier events from s on."""
  steps = []
  for event in (e for data in files for e in _events(data)):
    if event.HasField('session_log'):
      assert event.session_log.status == 1  # START
      steps = [s for s in steps if s < event.step]
    steps += [event.step for v in event.summary.value if v.tag == 'train/loss']
  return steps


def test_event_values_beyond_float32_are_infinite():
  [event] = _events(metrics_lib._event(7, scalar=('train/grad_norm', -1e39)))
  assert event.step == 7 and [(v.tag, v.simple_value) for v in event.summary.value] == [
      ('train/grad_norm', -float('inf'))]


def test_local_resume_appends_without_duplicates_or_gaps(tmp_path, monkeypatch):
  written = []
  rewrites = []
  original = fileio.write_atomic
  monkeypatch.setattr(fileio, 'write_atomic', lambda p, d: (rewrites.append(p), original(p, d)))
  _killed_and_resumed(str(tmp_path), 2, written)
  records = metrics_lib.read_records(str(tmp_path))
  assert _train_steps(records) == list(range(1, 10)) and len(written) == 12
  assert [r['step'] for r in records if 'eval/AP' in r] == [3]
  # One rewrite, the resume's (records past step 4 dropped); every log only appended.
  assert rewrites == [tmp_path / 'metrics.jsonl']
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']
  events = sorted(os.listdir(tmp_path / 'tensorboard'))
  assert len(events) == 2  # One file per process: local files are appended to, not rolled.
  assert _event_steps([(tmp_path / 'tensorboard' / n).read_bytes() for n in events]) == list(
      range(1, 10))


@pytest.fixture
def emulator(monkeypatch):
  if not gcs_emulator.available():
    pytest.skip('gcp-storage-emulator is not installed (pip install -r requirements-dev.txt)')
  with gcs_emulator.running() as url:
    for key, value in gcs_emulator.env(url).items():
      monkeypatch.setenv(key, value)
    yield url


def test_gs_resume_rolls_chunks_without_duplicates_or_gaps(emulator, monkeypatch):
  url, wd = emulator, 'metrics-run'
  uploads = []
  original = fileio.write_atomic
  monkeypatch.setattr(fileio, 'write_atomic', lambda p, d: (uploads.append(len(d)),
                                                            original(p, d)))
  written = []
  _killed_and_resumed(f'gs://{gcs_emulator.BUCKET}/{wd}', 3, written)
  records = metrics_lib.read_records(f'gs://{gcs_emulator.BUCKET}/{wd}')
  assert _train_steps(records) == list(range(1, 10))
  assert [r['step'] for r in records if 'eval/AP' in r] == [3]
  # Killed run: 1 2 3 | 3e 4 5 | 6 7; the resume cuts the second chunk to 3e 4, removes the
  # third, and goes on: 3e 4 5 | 6 7 8 | 9.
  names = gcs_emulator.names(url, f'{wd}/')
  assert [n for n in names if 'metrics.jsonl' in n] == [
      f'{wd}/metrics.jsonl.d/{i:06d}.jsonl' for i in range(4)]
  assert len(gcs_emulator.read(url, f'{wd}/metrics.jsonl.d/000003.jsonl').splitlines()) == 1
  # No upload holds more than one chunk of records or one file's events of 3 logs.
  assert max(uploads) < 1500, uploads
  events = [n for n in names if '/tensorboard/' in n]
  assert len(events) == 5  # 3 + 2 files of at most 3 logs each, uploaded whole.
  assert _event_steps([gcs_emulator.read(url, n) for n in events]) == list(range(1, 10))
