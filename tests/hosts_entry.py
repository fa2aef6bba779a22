"""retina_jax.main with a stand-in for training, for tests/test_hosts.py: its exit handling and
the hosts' watchdog as a real run has them, without building a model.

  python -m tests.hosts_entry --coordinator_address=... --num_processes=2 --process_id=K \
      --host_timeout_seconds=S --config=... [--fail_on=0,1 --error=MESSAGE]

Every process first meets the others in a collective; those in --fail_on then raise the same
error (what a config that the pod cannot run does), the others go on meeting in collectives
(what training does) until stopped: by the watchdog, or by a signal from the test.
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils

from retina_jax import cli
from retina_jax import main
from retina_jax import train

_FAIL_ON = flags.DEFINE_list('fail_on', [], 'Processes whose stand-in for training raises.')
_ERROR = flags.DEFINE_string('error', 'an error', 'What they raise (a ValueError).')


def _stand_in(config, workdir):
  del config, workdir
  multihost_utils.sync_global_devices('retina_jax test: every process started')
  me = jax.process_index()
  if str(me) in _FAIL_ON.value:
    logging.info('process %d raises at %.3f', me, time.time())
    try:
      raise OSError('the cause')
    except OSError as e:
      raise ValueError(_ERROR.value) from e
  logging.info('process %d steps', me)
  step = 0
  while True:
    step += 1
    multihost_utils.sync_global_devices(f'retina_jax test: step {step}')


if __name__ == '__main__':
  train.train_and_evaluate = _stand_in
  app.run(main.main, flags_parser=cli.parse_flags)
