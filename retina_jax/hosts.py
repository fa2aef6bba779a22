"""Multi-process runs: a lost process stops the others within a bound, and says which it was.

When a process dies, the others hang in their next collective. jax's coordination service
notices only after `heartbeat_timeout_seconds` and then aborts every other process (SIGABRT,
exit 134) under pages of its logs. `PeerWatchdog` instead has every process count its own beats
in the service's key-value store; when a peer's count stops moving for `timeout_s`, it calls
`on_lost` with one line naming that peer (main.py logs it and exits with a documented code).
The service's own heartbeat timeout is kept longer, as a backstop.
"""

import threading
import time
from typing import Callable

import jax
# The coordination service's client: jax 0.10 has no public handle to its key-value store
# (orbax reaches it the same way).
from jax._src import distributed as jax_distributed

_PREFIX = 'retina_jax/alive/'
_DONE = 'done'


class PeerWatchdog:
  """Beats every `timeout_s / 10` seconds (at least 1) in a daemon thread; `stop()` when this
  process ends on its own terms, so that its peers do not count it as lost."""

  def __init__(self, timeout_s: float, on_lost: Callable[[str], None]):
    self._client = jax_distributed.global_state.client
    self._me, self._count = jax.process_index(), jax.process_count()
    self._timeout_s = timeout_s
    self._on_lost = on_lost
    self._stopped = threading.Event()
    self._silent = threading.Event()
    threading.Thread(target=self._run, name='retina_jax-peer-watchdog', daemon=True).start()

  def _run(self):
    beat = 0
    seen = {}  # Peer -> (its last value, local time it last changed).
    while not self._stopped.wait(max(1.0, self._timeout_s / 10)):
      beat += 1
      try:
        if not self._silent.is_set():
          self._client.key_value_set(f'{_PREFIX}{self._me}', str(beat), allow_overwrite=True)
        values = {key.rsplit('/', 1)[-1]: value
                  for key, value in self._client.key_value_dir_get(_PREFIX)}
      except Exception as e:  # pylint: disable=broad-except
        if not self._stopped.is_set():
          self._on_lost(f'Lost contact with the coordinator (process 0 of {self._count}): '
                        f'{(str(e).strip().splitlines() or [repr(e)])[0]}. {self._what_to_do()}')
        return
      now = time.monotonic()
      for peer in range(self._count):
        value = values.get(str(peer))
        if peer == self._me or value == _DONE:
          continue
        if peer not in seen or seen[peer][0] != value:
          seen[peer] = (value, now)
        elif now - seen[peer][1] > self._timeout_s and not self._stopped.is_set():
          self._on_lost(f'Lost process {peer} of {self._count}: no sign of life for '
                        f'{now - seen[peer][1]:.0f} s (killed, out of memory, or its host '
                        f'failed: see its log). {self._what_to_do()}')
          return

  def _what_to_do(self) -> str:
    return (f'Process {self._me} stops too, without saving: restart every process with the '
            'same command to resume from the newest checkpoint.')

  def wait_for_a_lost_peer(self):
    """After an error in this process: stops beating, so that its peers see it go, and keeps
    watching them for one more timeout, so that an error a lost peer caused (gloo sometimes
    raises 'Connection reset by peer' before any timeout) ends as that loss (`on_lost`)."""
    self._silent.set()
    time.sleep(self._timeout_s + 2 * max(1.0, self._timeout_s / 10))

  def stop(self):
    self._stopped.set()
    try:
      self._client.key_value_set(f'{_PREFIX}{self._me}', _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # The coordinator is gone too: nobody is left to be told.
