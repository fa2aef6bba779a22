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

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from retina_jax import cli
from retina_jax import hosts
from retina_jax import sizes
from retina_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. '
                                          'experiments/retinanet_r50_coco.py:res=800,sched=1x',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the '
                               'resolved config; re-running with it resumes.')
_DISTRIBUTED = cli.define_distributed_flags()


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
  hosts.initialize(**{name: holder.value for name, holder in _DISTRIBUTED.items()})
  logging.info('JAX process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    sizes.check_here(_CONFIG.value)
  except sizes.SizeError as e:  # The same on every host, before any collective: one line, 1.
    logging.error('%s', e)
    hosts.exit_now(hosts.EXIT_FAILED)
  hosts.run(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value),
            _DISTRIBUTED['host_timeout_seconds'].value)


if __name__ == '__main__':
  cli.skip_absent_tpu()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
