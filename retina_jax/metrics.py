"""Training metrics of one workdir: JSON lines and TensorBoard events, and `read_records`.

A log costs the same at step 100 as at step 100,000:
- Local disk: records are appended to `metrics.jsonl` (flushed and synced at each log);
  TensorBoard events are appended to one event file under `tensorboard/`.
- Object store (gs://): an object has no append; rewriting one growing file at each log would
  cost I/O that grows with the square of the run length. Records go to chunks
  `metrics.jsonl.d/000000.jsonl`, `000001.jsonl`, ... of at most `records_per_chunk` records;
  only the last chunk is rewritten, whole, at each log, so a reader or a kill sees it before or
  after a record, never half a line. TensorBoard events are written to a local staging file,
  uploaded whole after each log, and a new file (uploaded from then on) is started every
  `records_per_chunk` logs.
`read_records` reads either layout (and both, in order, in a workdir that has both).
"""

import json
import math
import os
import shutil
import socket
import struct
import tempfile
import time

import google_crc32c
import jax

from retina_jax import fileio

JSONL = 'metrics.jsonl'
CHUNKS = 'metrics.jsonl.d'  # The chunks of a gs:// workdir, in the order of their names.
RECORDS_PER_CHUNK = 100  # A chunk of a few tens of kB: one upload per log at most that size.
_FLOAT32_MAX = 3.4028234663852886e38


def read_records(workdir) -> list[dict]:
  """Every record logged in `workdir` (local or gs://), in the order logged. A line cut short
  (a reader that meets a line being appended, a kill by an older writer) is left out."""
  return [record for path in _files(workdir) for _, record in _parse(path.read_text())]


class MetricLogger:
  """Writes the records of `read_records` and TensorBoard events, on host 0 only.

  Resuming at `resume_step` first drops what a killed run logged after its last checkpoint: the
  records past that step (and a line cut short), and, by TensorBoard's purge step, its events,
  so that every step appears once in both. A fresh run (`resume_step` 0) keeps what is there.
  """

  def __init__(self, workdir: str, resume_step: int = 0,
               records_per_chunk: int = RECORDS_PER_CHUNK):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    workdir = fileio.Path(workdir)
    self._per_chunk = records_per_chunk
    kept = _drop_records_after(workdir, resume_step if resume_step > 0 else None)
    chunks = [(path, lines) for path, lines in kept if path.parent.name == CHUNKS]
    # A local workdir that has chunks (copied from gs://) goes on with chunks, after them.
    self._chunked = fileio.is_url(workdir) or bool(chunks)
    if self._chunked:
      if chunks and len(chunks[-1][1]) < records_per_chunk:
        self._chunk, self._lines = int(chunks[-1][0].stem), chunks[-1][1]
      else:
        self._chunk, self._lines = int(chunks[-1][0].stem) + 1 if chunks else 0, []
      self._chunks = workdir / CHUNKS
      self._chunks.mkdir(parents=True, exist_ok=True)
    else:
      self._file = open(os.fspath(workdir / JSONL), 'a', encoding='utf-8')
    self._events = _Events(workdir / 'tensorboard', resume_step + 1 if resume_step > 0 else None,
                           records_per_chunk if fileio.is_url(workdir) else None)

  def write(self, step: int, metrics: dict[str, float], prefix: str = 'train'):
    if not self._active:
      return
    record = {'step': step, **{f'{prefix}/{k}': float(v) for k, v in metrics.items()}}
    line = json.dumps(record) + '\n'
    if self._chunked:
      if len(self._lines) == self._per_chunk:
        self._chunk, self._lines = self._chunk + 1, []
      self._lines.append(line)
      fileio.write_atomic(self._chunks / f'{self._chunk:06d}.jsonl', ''.join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())
    self._events.write(step, {k: v for k, v in record.items()
                              if k != 'step' and math.isfinite(v)})

  def close(self):
    if self._active:
      if not self._chunked:
        self._file.close()
      self._events.close()


class _Events:
  """TensorBoard event files in `folder`. With `logs_per_file` (object stores), each file is
  staged locally, uploaded whole after each log, and replaced by a new one after
  `logs_per_file` logs.

  The few records a scalar log needs are encoded here (`_event`): tensorboardX would import
  torch where it is installed (5 s per training process) and writes from a thread, so that a
  flush can leave the last events unwritten.
  """

  def __init__(self, folder, purge_step: int | None, logs_per_file: int | None):
    self._folder, self._per_file = folder, logs_per_file
    self._stage = tempfile.mkdtemp(prefix='retina_jax-events-') if logs_per_file else None
    self._open()
    if purge_step is not None:  # TensorBoard hides the earlier files' events from this step on.
      self._file.write(_event(purge_step, session_start=True))
      self._flush()

  def _open(self):
    local = self._stage or os.fspath(self._folder)
    os.makedirs(local, exist_ok=True)
    # TensorBoard's name: time in seconds and host; the suffix tells apart (and orders) the
    # files started in one second.
    self._name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
                  f'{time.time_ns():019d}')
    self._file = open(os.path.join(local, self._name), 'wb')
    self._file.write(_event(0, file_version='brain.Event:2'))
    self._logs = 0

  def _flush(self):
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._stage:
      with open(os.path.join(self._stage, self._name), 'rb') as f:
        fileio.write_atomic(self._folder / self._name, f.read())

  def write(self, step: int, scalars: dict[str, float]):
    if self._logs == self._per_file:
      self._file.close()  # Uploaded whole at its last log.
      os.remove(os.path.join(self._stage, self._name))
      self._open()
    self._file.write(b''.join(_event(step, scalar=item) for item in scalars.items()))
    self._logs += 1
    self._flush()

  def close(self):
    self._flush()
    self._file.close()
    if self._stage:
      shutil.rmtree(self._stage, ignore_errors=True)


def _event(step: int, *, file_version: str = '', session_start: bool = False,
           scalar: tuple[str, float] | None = None) -> bytes:
  """One record of an event file: a TFRecord (length, masked CRC-32C of it, data, masked
  CRC-32C of the data) holding an `Event` protocol buffer (tensorboard/compat/proto/event.proto):
  wall_time = 1, step = 2, file_version = 3, summary = 5 (Summary.value = 1: tag = 1,
  simple_value = 2), session_log = 7 (status = 1, START = 1)."""
  data = _tag(1, 1) + struct.pack('<d', time.time()) + _tag(2, 0) + _varint(step)
  if file_version:
    data += _length_delimited(3, file_version.encode())
  if scalar is not None:
    tag, value = scalar
    if abs(value) > _FLOAT32_MAX:  # A float32 field (struct would raise): infinite, as protobuf.
      value = math.copysign(math.inf, value)
    value_msg = _length_delimited(1, tag.encode()) + _tag(2, 5) + struct.pack('<f', value)
    data += _length_delimited(5, _length_delimited(1, value_msg))
  if session_start:
    data += _length_delimited(7, _tag(1, 0) + _varint(1))
  length = struct.pack('<Q', len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  return bytes(out + bytes([n]))


def _tag(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _length_delimited(field: int, data: bytes) -> bytes:
  return _tag(field, 2) + _varint(len(data)) + data


def _masked_crc(data: bytes) -> bytes:
  crc = google_crc32c.value(data)
  return struct.pack('<I', ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF)


def _files(workdir) -> list:
  """The files that hold the records of `workdir`, in order: metrics.jsonl, then the chunks."""
  workdir = fileio.Path(workdir)
  fileio.forget_listings(workdir / CHUNKS)  # Another process may have written since.
  files = [workdir / JSONL] if (workdir / JSONL).exists() else []
  if (workdir / CHUNKS).exists():
    files += sorted((p for p in (workdir / CHUNKS).iterdir() if p.suffix == '.jsonl'),
                    key=lambda p: p.name)
  return files


def _parse(text: str) -> list[tuple[str, dict]]:
  """(line, record) of each line of `text` that holds a whole record."""
  parsed = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict):
      parsed.append((line, record))
  return parsed


def _drop_records_after(workdir, step: int | None) -> list[tuple]:
  """Rewrites each file of `workdir` that holds a record past `step` (None: none) or a line cut
  short, and removes one left empty; returns (path, lines kept) of the files that remain. Run
  once, at the start: its cost grows with the run, a log's does not."""
  kept = []
  for path in _files(workdir):
    text = path.read_text()
    lines = [line + '\n' for line, record in _parse(text)
             if step is None or record.get('step', 0) <= step]
    if ''.join(lines) != text:
      if lines:
        fileio.write_atomic(path, ''.join(lines))
      else:
        path.unlink()
    if lines:
      kept.append((path, lines))
  return kept
