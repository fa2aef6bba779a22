"""Fused sweeps on the tiny model: each member's losses and parameters equal its separate run,
its workdir is a separate run's, a member gone non-finite stops while the others go on, and
members that cannot share one program are split into groups naming why."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from retina_jax import checkpoint as ckpt
from retina_jax import fused
from retina_jax import metrics as metrics_lib
from retina_jax import train
from tests.test_train import DEMO
from tests.test_train import ROOT
from tests.test_train import TINY
from tests.test_train import command_line
from tests.test_train import env_with_devices
from tests.test_train import read_metrics
from tests.test_train import shapes_root  # pylint: disable=unused-import (a fixture)
from tests.test_train import tiny_config

STEPS = 3
# gamma 0 / 0.5 / 2 with other alphas, the last with another learning rate and box weight.
MEMBERS = {
    'ce': {'loss.gamma': 0.0, 'loss.alpha': 0.75},
    'half': {'loss.gamma': 0.5, 'loss.alpha': 0.5},
    'fl_lr': {'loss.gamma': 2.0, 'loss.alpha': 0.25, 'optim.base_lr': 0.006,
              'loss.box_weight': 2.0},
}
# Trained in the same program: its learning rate makes it non-finite after its first step.
DIVERGING = {'diverging': {'optim.base_lr': 1e30}}
COMMON = {'num_train_steps': STEPS, 'checkpoint_every_steps': 1, 'optim.warmup_steps': 2,
          'optim.decay_steps': (2,), 'data.image_size': 64, 'data.min_size': 64,
          'data.max_size': 64}
# The fused run spreads its 4 members over sweep 2 x data 2 of the 4 fake devices (the separate
# runs are data parallel over all 4): one run tests both the numbers and the sweep axis, as
# each compile of the step costs a CI run ~25 s.
SWEEP = {'mesh.sweep_parallelism': 2}


def _configs(shapes_root, members):
  return [tiny_config(shapes_root, **COMMON, **SWEEP, **overrides)
          for overrides in members.values()]


@pytest.fixture(scope='module')
def fused_run(shapes_root, tmp_path_factory):
  root = tmp_path_factory.mktemp('fused')
  members = {**MEMBERS, **DIVERGING}
  workdirs = [str(root / name) for name in members]
  with _ErrorLog() as log:
    results = fused.train_and_evaluate(_configs(shapes_root, members), workdirs)
  return workdirs, results, log.messages


class _ErrorLog(logging.Handler):
  """The error lines logged inside the `with` block (a module fixture cannot use caplog)."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    logging.getLogger().addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger().removeHandler(self)


def test_each_member_equals_its_separate_run(shapes_root, fused_run, tmp_path):
  """Three steps, one process, the tiny model on 64 px square canvases, the fused members
  spread over a sweep axis (the last test). Left out: several hosts, a
  real TPU topology, orientation canvases, and longer runs: past ~5 steps a member drifts from
  its separate run (1.3% by step 30 at gamma 5 on the shapes demo) about as far as a separate
  run from parameters perturbed by 1e-7 drifts from the unperturbed one, rounding amplified by
  training (benchmarks/fused_drift.py, RESULTS.md), so longer runs cannot be compared at a
  float tolerance."""
  workdirs, results, _ = fused_run
  for (name, overrides), workdir, result in zip(MEMBERS.items(), workdirs, results):
    alone = str(tmp_path / name)
    train.train_and_evaluate(tiny_config(shapes_root, **COMMON, **overrides), alone)
    ours, theirs = read_metrics(workdir), read_metrics(alone)
    assert [r['step'] for r in ours] == [r['step'] for r in theirs] == list(range(1, STEPS + 1))
    for key in ('train/loss', 'train/cls_loss', 'train/box_loss', 'train/learning_rate'):
      np.testing.assert_allclose([r[key] for r in ours], [r[key] for r in theirs], rtol=2e-5,
                                 err_msg=f'{name} {key}')
    fused_vars, step = ckpt.restore_variables(workdir)
    alone_vars, alone_step = ckpt.restore_variables(alone)
    assert step == alone_step == STEPS
    # AdamW moves every parameter by about one learning rate per step whatever its gradient's
    # size, so rounding in a gradient near eps shows as a fraction of a step (lr 0.002).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
                 fused_vars, alone_vars)
    with open(os.path.join(alone, 'metrics_validation.json')) as f:
      assert result['AP'] == pytest.approx(json.load(f)['AP'], abs=0.01)
  # The learning rates really differ per member (one schedule each, not one shared).
  rates = [read_metrics(w)[-1]['train/learning_rate'] for w in workdirs[:3]]
  assert rates[2] == pytest.approx(rates[0] * 0.006 / 0.002)


def test_each_member_workdir_is_a_separate_runs(fused_run):
  workdirs, _, _ = fused_run
  for (name, overrides), workdir in zip(MEMBERS.items(), workdirs):
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
    assert saved['loss']['gamma'] == overrides['loss.gamma'], name
    assert saved['loss']['alpha'] == overrides['loss.alpha'], name
    assert saved['optim']['base_lr'] == overrides.get('optim.base_lr', 0.002), name
    assert saved['categories'], 'evaluate and predict read the categories from config.json'
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                  if s.isdigit()) == [1, 2, 3]
    assert os.listdir(os.path.join(workdir, 'tensorboard'))
    with open(os.path.join(workdir, 'metrics_validation.json')) as f:
      assert 'AP' in json.load(f)


def test_a_non_finite_member_stops_and_keeps_its_last_good_checkpoint(fused_run):
  workdirs, results, errors = fused_run
  workdir = workdirs[-1]
  assert results[-1] is None and all(r is not None for r in results[:-1])
  records = metrics_lib.read_records(workdir)
  stopped = [r['step'] for r in records if 'stopped/non_finite_step' in r]
  assert len(stopped) == 1 and stopped[0] > 1, records
  assert [r['step'] for r in records if 'train/loss' in r] == list(range(1, stopped[0]))
  variables, step = ckpt.restore_variables(workdir)
  assert step == stopped[0] - 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  assert not os.path.exists(os.path.join(workdir, 'metrics_validation.json'))
  assert any(f'diverging: non-finite loss or gradient at step {stopped[0]}' in m and
             f'last good checkpoint is step {step}' in m for m in errors), errors


def test_members_that_change_the_program_or_the_stream_are_split(shapes_root, tmp_path):
  configs = [tiny_config(shapes_root, **o) for o in (
      {'loss.gamma': 0.0}, {'loss.gamma': 2.0, 'optim.weight_decay': 0.1},
      {'anchors.sizes': (8.0, 16.0, 32.0, 64.0, 128.0)}, {'seed': 1})]
  groups, why = fused.plan(configs, [str(tmp_path / str(i)) for i in range(4)])
  assert groups == [[0, 1], [2], [3]]
  assert 'config.anchors.sizes' in why and 'config.seed' in why and '3 fused groups' in why
  with pytest.raises(ValueError, match=r'differ in config\.anchors\.sizes$'):
    fused.train_and_evaluate(configs[1:3], [str(tmp_path / 'a'), str(tmp_path / 'b')])


def test_one_command_trains_the_demo_sweep_fused_and_a_rerun_skips_it(shapes_root, tmp_path):
  """scripts/sweep.py --fused on the demo's Table 1b sweep (5 members, tiny and short): one
  workdir per member with its own config, evaluation and the AP table; run again, it skips
  every finished member and trains nothing."""
  overrides = {**TINY, 'data.root': shapes_root, 'num_train_steps': 2, 'data.image_size': 64,
               'data.min_size': 64, 'data.max_size': 64}
  command = [sys.executable, os.path.join(ROOT, 'scripts', 'sweep.py'), DEMO, '--fused',
             '--workdir_root', str(tmp_path), '--', *command_line(overrides, '')[5:]]
  first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                         env=env_with_devices(1))
  assert first.returncode == 0, first.stderr[-3000:]
  assert '5 members fused in one program' in first.stderr
  sweep_dir = tmp_path / 'shapes_demo'
  workdirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
  gammas = []
  for workdir in workdirs:
    gammas.append(json.loads((workdir / 'config.json').read_text())['loss']['gamma'])
    assert 'AP' in json.loads((workdir / 'metrics_validation.json').read_text())
  assert sorted(gammas) == [0.0, 0.5, 1.0, 2.0, 5.0]
  table = (sweep_dir / 'summary.md').read_text()
  assert table in first.stdout and len(table.strip().splitlines()) == 2 + 5
  summary = json.loads((sweep_dir / 'summary.json').read_text())
  assert set(summary) == {w.name for w in workdirs}
  again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                         env=env_with_devices(1))
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('finished and evaluated, skipped') == 5
  assert 'Compiling' not in again.stderr and again.stdout.count('finished before: skipped') == 5
  assert ({k: v['metrics'] for k, v in summary.items()} ==
          {k: v['metrics'] for k, v in json.loads((sweep_dir / 'summary.json').read_text()).items()})


def test_members_spread_over_a_sweep_axis(shapes_root, fused_run):
  """The fused run above trained its 4 members on a sweep 2 x data 2 mesh (their numbers equal
  the separate runs', the test above): its mesh, and the member axis of its state split over
  'sweep', two members per shard. Left out: a fused run on a mesh without a sweep axis is
  compared with separate runs only through it (a 'sweep' axis of size 1); the one-command test
  runs one, on one device."""
  del fused_run  # Trained on the mesh checked here.
  configs = _configs(shapes_root, {**MEMBERS, **DIVERGING})
  mesh = fused.make_mesh(configs[0], len(configs))
  assert dict(mesh.shape) == {'sweep': 2, 'data': 2, 'model': 1}
  leaf = fused.stack([{'w': np.arange(3.0)}] * len(configs), mesh)['w']
  assert leaf.sharding.spec[0] == 'sweep'
  assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}
  np.testing.assert_array_equal(fused.member({'w': leaf}, 3)['w'], np.arange(3.0))
  with pytest.raises(ValueError, match='sweep_parallelism=2 must divide'):
    fused.make_mesh(configs[0], 3)
