"""Training entry point: parses flags and calls `train.train_and_evaluate(config, workdir)`.

  python -m retina_jax.main --config experiments/<file>.py[:arg] --workdir DIR \
      [--config.some.field=value ...]

Re-running the same command resumes from the newest checkpoint in DIR. On a TPU pod every host
runs the same command; `jax.distributed.initialize()` finds its peers from the environment.

Exit codes (README, "Exit codes"): 0 a finished run; 143 preempted after saving, re-run to
resume; 1 an error that a restart would only repeat.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from retina_jax import checkpoint
from retina_jax import cli
from retina_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. '
                                          'experiments/retinanet_r50_coco.py:800_1x',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the '
                               'resolved config; re-running with it resumes.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 for '
                                   'multi-process runs outside a TPU pod (CPU/GPU clusters).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'With --coordinator_address.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with '
                                 'what the environment says (TPU pods, SLURM).')

# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended, so a scheduler sees the
# same code whether the signal came before or after training could save.
EXIT_PREEMPTED = 143


def initialize_distributed():
  if _COORDINATOR.value:
    # Only affects CPU devices (the multi-process CPU tests); must precede backend start-up.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


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
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(EXIT_PREEMPTED)
  except (train.NonFiniteError, checkpoint.DamagedCheckpointError) as e:
    # The message says what happened, where and what to do: no traceback above it.
    logging.error('%s', e)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
