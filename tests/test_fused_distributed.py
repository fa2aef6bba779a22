"""A fused sweep on 2 processes x 2 devices (`scripts/sweep.py --fused`, one process per host)
trains like the same command on 1 process x 4 devices."""

import os
import subprocess
import sys

import numpy as np
import pytest

from retina_jax import metrics as metrics_lib
from tests.test_train import ROOT
from tests.test_train import TINY
from tests.test_train import command_line
from tests.test_train import env_with_devices
from tests.test_train import read_metrics
from tests.test_train_distributed import _free_port

# Two members of the demo's gamma sweep: the fewest that split over a 'sweep' axis of 2.
EXPERIMENT = '''from experiments.smoke.shapes_demo import get_config  # pylint: disable=unused-import


def get_sweep(hyper):
  return hyper.zipit([hyper.sweep('config.loss.gamma', [0.0, 2.0]),
                      hyper.sweep('config.loss.alpha', [0.75, 0.25])])
'''


def _sweep(experiment, root, overrides, *flags):
  return [sys.executable, os.path.join(ROOT, 'scripts', 'sweep.py'), experiment, '--fused',
          '--workdir_root', root, '--', *command_line(overrides, '')[5:], *flags]


@pytest.mark.slow
def test_two_hosts_of_two_devices_train_a_fused_sweep_like_one_host_of_four(tmp_path):
  """The members over a 'sweep' axis of 2: on one host sweep 2 x data 2 of its 4 devices; on
  two hosts each host trains one member's shard on its 2 devices, so both load the whole batch,
  and evaluation splits the images over the hosts. Left out: 'data' across the hosts in
  training (sweep_parallelism 1; what a separate run does, tests/test_train_distributed.py), a
  real TPU pod, preemption and a lost host (tests/test_train_distributed.py, on
  retina_jax.main's same exit handling)."""
  experiment = tmp_path / 'pair.py'
  experiment.write_text(EXPERIMENT)
  overrides = {**TINY, 'data.root': str(tmp_path / 'shapes'), 'num_train_steps': 3,
               'checkpoint_every_steps': 3,
               'data.image_size': 64, 'data.min_size': 64, 'data.max_size': 64,
               'mesh.sweep_parallelism': 2}
  one = str(tmp_path / 'one')
  alone = subprocess.run(_sweep(str(experiment), one, overrides), env=env_with_devices(4),
                         cwd=ROOT, capture_output=True, text=True)
  assert alone.returncode == 0, alone.stderr[-3000:]
  two = str(tmp_path / 'two')
  port = _free_port()
  procs = [subprocess.Popen(
      _sweep(str(experiment), two, overrides, f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes', '2', f'--process_id={i}'),
      env=env_with_devices(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert 'process 1 of 2, 2 local / 4 global devices' in outputs[1]
  # The summary table is printed (and written) by process 0 alone.
  assert 'Sweep summary' in outputs[0] and 'Sweep summary' not in outputs[1]

  names = sorted(os.listdir(os.path.join(one, 'pair')))
  assert sorted(os.listdir(os.path.join(two, 'pair'))) == names
  members = [n for n in names if os.path.isdir(os.path.join(one, 'pair', n))]
  assert len(members) == 2 and 'summary.md' in names, names
  for name in members:
    ours, theirs = (os.path.join(root, 'pair', name) for root in (two, one))
    a, b = read_metrics(theirs), read_metrics(ours)
    # One record per step: only process 0 writes the metrics.
    assert [m['step'] for m in a] == [m['step'] for m in b] == [1, 2, 3], name
    for key in ('train/loss', 'train/cls_loss', 'train/box_loss'):
      np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-5,
                                 err_msg=f'{name} {key}')
    evaluations = [r for r in metrics_lib.read_records(ours) if 'eval/AP' in r]
    assert [r['step'] for r in evaluations] == [3], name
    assert evaluations[0]['eval/AP'] == pytest.approx(
        [r for r in metrics_lib.read_records(theirs) if 'eval/AP' in r][0]['eval/AP'], abs=1e-4)
