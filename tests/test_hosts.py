"""How a two-process run ends (retina_jax/hosts.py under retina_jax/main.py): an error is
reported as that error on every process (exit 1, within seconds), and only a process that is
really gone (killed, hung) makes its peer exit 75. Training is a stand-in (tests/hosts_entry.py)
that meets in collectives; tests/test_train_distributed.py kills a process of a real run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import DEMO, ROOT, env_with_devices
from tests.test_train_distributed import _free_port

pytestmark = pytest.mark.slow

ERROR = 'config.eval_batch_size=8 cannot be split over 16 devices'


def _start_two(tmp_path, timeout_s, *flags):
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    logs.append(tmp_path / f'process_{i}.log')
    with open(logs[-1], 'w') as log:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'tests.hosts_entry', f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}', f'--host_timeout_seconds={timeout_s}',
           f'--config={DEMO}', '--config.batch_size=4', '--config.eval_batch_size=4', *flags],
          env=env_with_devices(2), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
  return procs, logs


def _wait(procs, logs, deadline_s=120, until=lambda: False):
  """Each process's exit time (None while it runs), until all ended or `until()` holds."""
  ended = [None] * len(procs)
  deadline = time.time() + deadline_s
  while time.time() < deadline and None in ended and not until():
    now = time.time()
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = now
    time.sleep(0.05)
  if time.time() >= deadline:
    for p in procs:
      p.kill()
    raise AssertionError('\n'.join(log.read_text()[-3000:] for log in logs))
  return ended


def _raised_at(text: str) -> float:
  return float(text.split(' raises at ')[1].split()[0])


def test_the_same_error_on_both_ends_both_with_it(tmp_path):
  # A loss would take 30 s to be declared: exits within seconds are no loss.
  procs, logs = _start_two(tmp_path, 30, '--fail_on=0,1', f'--error={ERROR}')
  ended = _wait(procs, logs)
  outs = [log.read_text() for log in logs]
  for p, out, end in zip(procs, outs, ended):
    assert p.returncode == 1, out[-3000:]
    assert ERROR in out and 'OSError: the cause' in out  # With its cause (a traceback).
    assert 'Lost process' not in out
    assert end - _raised_at(out) < 15, out[-3000:]
  assert 'Process 1 of 2 failed too' in outs[0] and 'Process 0 of 2 failed too' in outs[1]
  assert ended[0] >= ended[1]  # The coordinator leaves last.


def test_an_error_on_one_ends_both_naming_it(tmp_path):
  """Process 1 fails while the coordinator waits for it in a collective. Left out: the
  coordinator failing alone (it waits for the others to leave, as in the test above)."""
  failing = 1
  procs, logs = _start_two(tmp_path, 30, f'--fail_on={failing}', f'--error={ERROR}')
  ended = _wait(procs, logs)
  outs = [log.read_text() for log in logs]
  other = 1 - failing
  assert [p.returncode for p in procs] == [1, 1], outs[0][-3000:] + outs[1][-3000:]
  assert ERROR in outs[failing] and 'OSError: the cause' in outs[failing]
  # One line names the process that failed, its error and its cause.
  assert (f'Process {failing} of 2 failed: ValueError: {ERROR} (caused by OSError: the cause)'
          f'. Process {other} stops too' in outs[other]), outs[other][-3000:]
  raised = _raised_at(outs[failing])
  assert max(ended) - raised < 15, outs[0][-3000:] + outs[1][-3000:]
  assert ended[0] >= ended[1]
  assert not any('Lost process' in out for out in outs)


@pytest.mark.parametrize('gone, how, says', [
    (1, signal.SIGKILL, 'Lost process 1 of 2: no sign of life'),
    (1, signal.SIGSTOP, 'Lost process 1 of 2: no sign of life'),
    # Its store hangs, raising nothing, until jax aborts (134) after its heartbeat timeout.
    (0, signal.SIGSTOP, 'Lost contact with the coordinator (process 0 of 2): no answer'),
], ids=['killed', 'hung', 'coordinator_hung'])
def test_a_process_that_is_gone_makes_its_peer_exit_75(tmp_path, gone, how, says):
  procs, logs = _start_two(tmp_path, 5)
  _wait(procs, logs, until=lambda: all(' steps' in log.read_text() for log in logs))
  assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
  peer = 1 - gone
  os.kill(procs[gone].pid, how)
  gone_at = time.time()
  try:
    ended = _wait(procs[peer:peer + 1], logs)
  finally:
    procs[gone].kill()
    procs[gone].wait()
  out = logs[peer].read_text()
  assert procs[peer].returncode == 75, out[-3000:]
  assert says in out and 'restart every process' in out
  assert 'of 2 failed' not in out  # Not taken for a failure, even if gloo raised in a step.
  # The 5 s timeout and a beat a second; loose for a loaded machine.
  assert 4 < ended[0] - gone_at < 30, out[-3000:]
