"""Multi-process runs: every process ends with a code that says what happened to the run, and
every log says why.

Left alone, a multi-process run ends badly either way. When a process dies, the others hang in
their next collective until jax's coordination service notices (`heartbeat_timeout_seconds`)
and aborts them (SIGABRT, exit 134) under pages of its logs. When a process fails with an error
that a restart would repeat, its peers hang the same way; and when every process fails at once
(a config that the pod cannot run), each one that goes quiet looks lost to the others.

`PeerWatchdog` keeps two keys per process k in the service's key-value store:
  retina_jax/alive/<k>   a count that moves every `period` seconds while k runs; 'done' once k
                         ended on its own terms (finished, preempted); 'exit' once it stopped
                         after a failure (its own or a peer's) and beats no more.
  retina_jax/failed/<k>  k's error, on one line.
A process whose work raised publishes failed/<k> (`fail`), keeps beating, and waits until every
peer has settled: failed too, done, stopped, or lost. A peer that sees failed/<k> stops too,
naming k and its error. Both exit 1 (`EXIT_FAILED`: a restart would repeat it), within seconds
when every process is alive. Only a peer without a beat for `timeout_s` (killed, hung,
unreachable) is lost: the others stop naming it and exit 75 (`EXIT_HOST_LOST`: restart them
all). Process 0 leaves last: the service lives in it, and the others' last reads go through it.
The service's own heartbeat timeout is kept longer, as a backstop.

`initialize` starts a multi-process run and `run` runs a training command's work under the
watchdog, ending the process with its code (retina_jax.main and scripts/sweep.py --fused).
"""

import logging as std_logging
import os
import sys
import threading
import time
from typing import Callable, NoReturn

from absl import logging
import jax
# The coordination service's client: jax 0.10 has no public handle to its key-value store
# (orbax reaches it the same way).
from jax._src import distributed as jax_distributed

from retina_jax import checkpoint
from retina_jax import run_control
from retina_jax import sizes

EXIT_FAILED = 1
# EX_TEMPFAIL: another process was lost; this one stopped without saving. Restart them all.
EXIT_HOST_LOST = 75
# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended, so a scheduler sees the
# same code whether the signal came before or after training could save.
EXIT_PREEMPTED = 143

# Errors whose message says what happened, where and what to do: logged without a traceback.
_SAYS_WHAT_TO_DO = (run_control.NonFiniteError, run_control.WorkdirError,
                    run_control.EvaluationError, checkpoint.DamagedCheckpointError,
                    checkpoint.CheckpointWriteError, sizes.SizeError)


def initialize(coordinator_address: str = '', num_processes: int = 1, process_id: int = 0,
               distributed: bool = False, host_timeout_seconds: int = 120):
  """Starts jax.distributed for a multi-process run (the flags of
  `cli.define_distributed_flags`); a single-process run (no address, not `distributed`) starts
  nothing."""
  # jax's own heartbeat timeout aborts the survivors (exit 134): only the backstop of
  # PeerWatchdog, which names the lost process first.
  timeouts = {'heartbeat_timeout_seconds': host_timeout_seconds + 60}
  if coordinator_address:
    # Only affects CPU devices (the multi-process CPU tests); must precede backend start-up.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, **timeouts)
  elif distributed:
    jax.distributed.initialize(**timeouts)


def exit_now(code: int) -> NoReturn:
  """Exits without jax.distributed's shutdown barrier: other processes may be waiting for this
  one in a collective, and learn that it is gone (their watchdogs name it) only once it is."""
  for stream in [h for h in std_logging.getLogger().handlers] + [sys.stdout, sys.stderr]:
    stream.flush()
  os._exit(code)  # pylint: disable=protected-access


def run(work: Callable[[], None], host_timeout_seconds: int) -> NoReturn:
  """Runs `work()` and ends the process with the code that says what happened to the run: 0
  finished; EXIT_PREEMPTED after run_control.Preempted (saved; re-run to resume); EXIT_FAILED
  after an error, here or (named) on another process; EXIT_HOST_LOST when another process was
  lost. With several processes a `PeerWatchdog` settles the code with the peers."""
  # Its thread ends the process (EXIT_HOST_LOST or EXIT_FAILED) when a peer was lost or failed,
  # while the main one may hang in a collective.
  watchdog = (PeerWatchdog(host_timeout_seconds, exit_now=exit_now)
              if jax.process_count() > 1 else None)
  try:
    work()
    code = 0
  except run_control.Preempted as e:
    logging.warning('%s', e)
    code = EXIT_PREEMPTED
  except Exception as e:  # pylint: disable=broad-except
    if watchdog and watchdog.stopping:  # A peer failed or was lost first, most likely the cause.
      logging.warning('Then process %d failed too: %s', jax.process_index(), one_line(e))
    elif isinstance(e, _SAYS_WHAT_TO_DO):
      logging.error('%s', e)
    else:
      logging.exception('Training failed:')
    if watchdog:  # Tells the peers, waits for them to settle, then ends with their verdict.
      watchdog.fail(one_line(e))
    exit_now(EXIT_FAILED)
  if watchdog:
    watchdog.stop()  # Finished or preempted, as every other process.
  sys.exit(code)

_ALIVE = 'retina_jax/alive/'
_FAILED = 'retina_jax/failed/'
_DONE = 'done'
_EXIT = 'exit'
_MAX_LINE = 1000  # Characters of an error kept in the store (each peer logs it).


def one_line(error: BaseException) -> str:
  """`error` and what caused it, on one line: 'ValueError: msg (caused by OSError: msg)'."""
  parts = []
  while error is not None and len(parts) < 3:
    text = (str(error).strip().splitlines() or [''])[0]
    parts.append(f'{type(error).__name__}: {text}' if text else type(error).__name__)
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return ' (caused by '.join(parts) + ')' * (len(parts) - 1)


class PeerWatchdog:
  """Beats and watches the peers in a daemon thread, which ends the process (`exit_now(code)`)
  when a peer failed or was lost, or after `fail()`. `stop()` when this process ends on its own
  terms, so that its peers do not count it as lost."""

  def __init__(self, timeout_s: float, exit_now: Callable[[int], None]):
    self._client = jax_distributed.global_state.client
    self._me, self._count = jax.process_index(), jax.process_count()
    self._timeout_s = timeout_s
    # At least a beat a second, whatever the timeout: a failure reaches every peer in seconds.
    self._period = min(1.0, timeout_s / 5)
    self._exit_now = exit_now
    self._stopped = threading.Event()
    self._failed = threading.Event()  # This process failed: fail() published it.
    self._stopping = threading.Event()  # A failure or a loss is being settled.
    self._asked_at = None  # When the store was asked something not yet answered.
    self._thread = threading.Thread(target=self._run, name='retina_jax-peer-watchdog',
                                    daemon=True)
    self._thread.start()
    threading.Thread(target=self._watch_the_coordinator, name='retina_jax-coordinator-watchdog',
                     daemon=True).start()

  @property
  def stopping(self) -> bool:
    """Whether a peer's failure or loss (or this process's own) already ends this process."""
    return self._stopping.is_set()

  def fail(self, line: str):
    """After an error in this process, logged: publishes `line` to the peers and waits while
    the watchdog's thread settles with them and ends the process. A peer that failed or was
    lost first is the cause: then `line` is not published. Returns only if that thread is gone
    (the process had stopped its watchdog)."""
    if not self._stopping.is_set():
      try:
        self._client.key_value_set(f'{_FAILED}{self._me}', line[:_MAX_LINE],
                                   allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except
        pass  # The coordinator is gone: the watchdog's thread says so and ends the process.
    self._failed.set()
    self._thread.join(self._timeout_s + 10 * self._period)

  def stop(self):
    if self._stopping.is_set():  # A peer failed or was lost: its code, not this one's, ends.
      self._thread.join(self._timeout_s + 10 * self._period)
    self._stopped.set()
    try:
      self._client.key_value_set(f'{_ALIVE}{self._me}', _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # The coordinator is gone too: nobody is left to be told.

  def _read(self, prefix: str) -> dict[int, str]:
    return {int(key.rsplit('/', 1)[-1]): value
            for key, value in self._client.key_value_dir_get(prefix)}

  def _run(self):
    beat = 0
    seen = {}  # Peer -> (its last value, local time it last changed).
    named = set()  # Peers whose failure or loss this process has logged.
    code, give_up, beating = None, None, True
    peers = [p for p in range(self._count) if p != self._me]
    while not self._stopped.wait(self._period):
      beat += 1
      try:
        self._asked_at = time.monotonic()
        if beating:
          self._client.key_value_set(f'{_ALIVE}{self._me}', str(beat), allow_overwrite=True)
        alive, failed = self._read(_ALIVE), self._read(_FAILED)
        self._asked_at = None
      except Exception as e:  # pylint: disable=broad-except
        if not self._stopped.is_set():
          logging.error('Lost contact with the coordinator (process 0 of %d): %s. %s',
                        self._count, (str(e).strip().splitlines() or [repr(e)])[0],
                        self._restart_all())
          self._exit_now(EXIT_HOST_LOST)
        return
      now = time.monotonic()
      lost = {}
      for peer in peers:
        value = alive.get(peer)
        if value in (_DONE, _EXIT) or peer in failed:
          continue
        if peer not in seen or seen[peer][0] != value:
          seen[peer] = (value, now)
        elif now - seen[peer][1] > self._timeout_s:
          lost[peer] = now - seen[peer][1]

      for peer in sorted(set(failed) - named - {self._me}):
        named.add(peer)
        if self._failed.is_set():
          logging.error('Process %d of %d failed too: %s', peer, self._count, failed[peer])
        else:
          logging.error('Process %d of %d failed: %s. Process %d stops too; process %d\'s log '
                        'has the details.', peer, self._count, failed[peer], self._me, peer)
      for peer in sorted(set(lost) - named):
        named.add(peer)
        logging.error('Lost process %d of %d: no sign of life for %.0f s (killed, hung, out of '
                      'memory, or its host failed: see its log). %s', peer, self._count,
                      lost[peer], self._restart_all())
      if lost:
        code = EXIT_HOST_LOST
      elif code is None and (self._failed.is_set() or set(failed) - {self._me}):
        code = EXIT_FAILED
      if code is None:
        continue

      if give_up is None:
        self._stopping.set()
        # Bounds the wait for peers that neither settle nor go quiet (none should).
        give_up = now + self._timeout_s + 5 * self._period
      settled = all(alive.get(p) in (_DONE, _EXIT) or p in failed or p in lost for p in peers)
      # A failing process beats on until its peers have seen its failure; any other one is
      # settled at once and says so.
      if beating and (settled or not self._failed.is_set() or now > give_up):
        beating = False
        try:
          self._client.key_value_set(f'{_ALIVE}{self._me}', _EXIT, allow_overwrite=True)
        except Exception:  # pylint: disable=broad-except
          pass  # The coordinator is gone: nobody is left to be told.
      gone = all(alive.get(p) in (_DONE, _EXIT) or p in lost for p in peers)
      if not beating and ((settled and self._me != 0) or gone or now > give_up):
        self._exit_now(code)
        return

  def _watch_the_coordinator(self):
    """A hung coordinator answers nothing and raises nothing: the store's calls just wait."""
    while not self._stopped.wait(self._period):
      asked = self._asked_at
      if asked is not None and time.monotonic() - asked > self._timeout_s:
        logging.error('Lost contact with the coordinator (process 0 of %d): no answer for %.0f '
                      's (hung, or its host is unreachable). %s', self._count,
                      time.monotonic() - asked, self._restart_all())
        self._exit_now(EXIT_HOST_LOST)
        return

  def _restart_all(self) -> str:
    return (f'Process {self._me} stops too, without saving: restart every process with the '
            'same command to resume from the newest checkpoint.')
