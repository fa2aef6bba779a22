"""Training entry point: parses flags and calls `train.train_and_evaluate(config, workdir)`.

  python -m retina_jax.main --config experiments/<file>.py[:arg] --workdir DIR \
      [--config.some.field=value ...]

Re-running the same command resumes from the newest checkpoint in DIR. On a TPU pod every host
runs the same command; `jax.distributed.initialize()` finds its peers from the environment.

Exit codes (README, "Exit codes"): 0 a finished run; 143 preempted after saving, re-run to
resume; 75 another process was lost (killed, hung, unreachable), restart all; 1 an error that a
restart would only repeat, in this process or another one (every process names it).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from retina_jax import checkpoint
from retina_jax import cli
from retina_jax import hosts
from retina_jax import run_control
from retina_jax import sizes
from retina_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. '
                                          'experiments/retinanet_r50_coco.py:res=800,sched=1x',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the '
                               'resolved config; re-running with it resumes.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 for '
                                   'multi-process runs outside a TPU pod (CPU/GPU clusters).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'With --coordinator_address.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with '
                                 'what the environment says (TPU pods, SLURM).')

_HOST_TIMEOUT = flags.DEFINE_integer(
    'host_timeout_seconds', 120, 'Multi-process runs: how long a process may show no sign of '
    'life before every other one stops with exit code 75, naming it. A process that fails '
    'says so at once: the others stop within seconds, naming it, with exit code 1.')

# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended, so a scheduler sees the
# same code whether the signal came before or after training could save.
EXIT_PREEMPTED = 143


def initialize_distributed():
  # jax's own heartbeat timeout aborts the survivors (exit 134): only the backstop of
  # hosts.PeerWatchdog, which names the lost process first.
  timeouts = {'heartbeat_timeout_seconds': _HOST_TIMEOUT.value + 60}
  if _COORDINATOR.value:
    # Only affects CPU devices (the multi-process CPU tests); must precede backend start-up.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, **timeouts)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize(**timeouts)


def _exit_now(code: int):
  """Exits without jax.distributed's shutdown barrier: other processes may be waiting for this
  one in a collective, and learn that it is gone (their watchdogs name it) only once it is."""
  for stream in [h for h in std_logging.getLogger().handlers] + [sys.stdout, sys.stderr]:
    stream.flush()
  os._exit(code)  # pylint: disable=protected-access


class _QuietLibraries:
  """Drops INFO lines of orbax (several per checkpoint) and of gcsfs/fsspec (one per file read
  on gs://) so progress lines stay readable."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        f'/{name}/' in record.pathname for name in ('orbax', 'gcsfs', 'fsspec'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  initialize_distributed()
  logging.info('JAX process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    sizes.check_here(_CONFIG.value)
  except sizes.SizeError as e:  # The same on every host, before any collective: one line, 1.
    logging.error('%s', e)
    _exit_now(1)
  # Its thread ends the process (hosts.EXIT_HOST_LOST or EXIT_FAILED) when a peer was lost or
  # failed, while the main one may hang in a collective.
  watchdog = (hosts.PeerWatchdog(_HOST_TIMEOUT.value, exit_now=_exit_now)
              if jax.process_count() > 1 else None)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    code = 0
  except run_control.Preempted as e:
    logging.warning('%s', e)
    code = EXIT_PREEMPTED
  except Exception as e:  # pylint: disable=broad-except
    if watchdog and watchdog.stopping:  # A peer failed or was lost first, most likely the cause.
      logging.warning('Then process %d failed too: %s', jax.process_index(), hosts.one_line(e))
    elif isinstance(e, (run_control.NonFiniteError, run_control.WorkdirError,
                        run_control.EvaluationError, checkpoint.DamagedCheckpointError,
                        checkpoint.CheckpointWriteError)):
      logging.error('%s', e)  # It says what happened, where and what to do: no traceback.
    else:
      logging.exception('Training failed:')
    if watchdog:  # Tells the peers, waits for them to settle, then ends with their verdict.
      watchdog.fail(hosts.one_line(e))
    _exit_now(hosts.EXIT_FAILED)
  if watchdog:
    watchdog.stop()  # Finished or preempted, as every other process.
  sys.exit(code)


if __name__ == '__main__':
  cli.skip_absent_tpu()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
