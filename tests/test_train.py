"""The real train step and loop on a tiny model: steps, sweeps, NaN guard, exact resume after a
killed process, restore on another device count, and the ahead-of-time compile of R50-FPN."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from retina_jax import checkpoint as ckpt
from retina_jax import models
from retina_jax import sharding as sharding_lib
from retina_jax import train
from retina_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'experiments', 'smoke', 'shapes_demo.py')

# Overrides that make the demo experiment tiny; used in-process and on command lines alike.
TINY = {
    'batch_size': 4, 'num_train_steps': 6, 'log_every_steps': 1, 'checkpoint_every_steps': 2,
    'eval_every_steps': 0, 'eval_batch_size': 4, 'num_demo_pictures': 0,
    'model.fpn_channels': 16, 'model.head_channels': 16, 'model.head_convs': 1,
    'data.shapes_num_train': 24, 'data.shapes_num_eval': 4, 'data.num_workers': 1,
    'data.max_eval_images': 4, 'optim.warmup_steps': 2, 'optim.decay_steps': (4,),
}


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def tiny_config(shapes_root, **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location('demo', DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in {**TINY, 'data.root': shapes_root, **overrides}.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def command_line(config_overrides: dict, workdir: str) -> list[str]:
  flags = []
  for key, value in config_overrides.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
    flags.append(f'--config.{key}={value}')
  return [sys.executable, '-m', 'retina_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
          *flags]


def env_with_devices(n: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def read_metrics(workdir: str) -> list[dict]:
  """The training records of metrics.jsonl (evaluation records are left out)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if 'train/loss' in r]


def finished_checkpoints(workdir: str) -> list[int]:
  """Steps whose checkpoint is complete (orbax renames a step's folder to its number last)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_two_real_steps_train_and_compile_once(shapes_root):
  config = tiny_config(shapes_root)
  mesh = sharding_lib.make_mesh(config)
  model = models.create_model(config)
  state, tx = train.create_train_state(config, model, mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  source = pipeline.create_source(config.data, config.data.train_split)
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed)
  before = jax.device_get(state.params)
  losses = []
  for step in range(2):
    state, metrics = step_fn(state, sharding_lib.to_global(loader.batch(step), mesh))
    losses.append(float(metrics['loss']))
    assert metrics['num_foreground'] > 0
  assert all(np.isfinite(losses))
  assert int(state.step) == 2 and int(state.first_bad_step) == -1
  after = jax.device_get(state.params)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))
  assert any(changed)
  assert step_fn._cache_size() == 1, 'the step recompiled'
  assert len(state.params['backbone' if 'backbone' in state.params else
                          next(iter(state.params))]) > 0


def test_sweep_value_changes_the_loss_and_lands_in_the_resolved_config(shapes_root, tmp_path):
  first_losses = {}
  for gamma in (0.0, 2.0):
    workdir = str(tmp_path / f'gamma{gamma}')
    config = tiny_config(shapes_root, num_train_steps=1, **{'loss.gamma': gamma})
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
      assert json.load(f)['loss']['gamma'] == gamma
    first_losses[gamma] = read_metrics(workdir)[0]['train/loss']
  assert first_losses[0.0] != pytest.approx(first_losses[2.0], rel=1e-3)


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(shapes_root, tmp_path):
  config = tiny_config(shapes_root, **{'optim.base_lr': 1e30, 'optim.warmup_steps': 0})
  with pytest.raises(train.NonFiniteError, match=r'step \d+.*last good checkpoint'):
    train.train_and_evaluate(config, str(tmp_path))
  steps = ckpt.make_manager(str(tmp_path), 3).all_steps()
  for step in steps:
    variables, _ = ckpt.restore_variables(str(tmp_path), step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


@pytest.mark.slow
def test_killed_run_resumes_bitwise_and_restores_on_other_device_counts(shapes_root, tmp_path):
  overrides = {**TINY, 'data.root': shapes_root, 'num_train_steps': 8}
  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  subprocess.run(command_line(overrides, full), env=env_with_devices(4), check=True, cwd=ROOT,
                 capture_output=True)

  proc = subprocess.Popen(command_line(overrides, killed), env=env_with_devices(4), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  kill_after = int(np.random.default_rng().integers(3, 7))
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (any(m['step'] >= kill_after for m in read_metrics(killed)) and
        finished_checkpoints(killed)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_before_resume = [m['step'] for m in read_metrics(killed)]
  resumed = subprocess.run(command_line(overrides, killed), env=env_with_devices(4), cwd=ROOT,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed' in resumed.stderr
  after = [m['step'] for m in read_metrics(killed)][len(steps_before_resume):]
  # Resumed at the last checkpoint (a multiple of 2), then every later step exactly once.
  assert after == list(range(after[0], 9)) and after[0] % 2 == 1

  a, step_a = ckpt.restore_variables(full)
  b, step_b = ckpt.restore_variables(killed)
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, a, b)

  # The 4-device checkpoint continues on 2 devices.
  more = {**overrides, 'num_train_steps': 10}
  cont = subprocess.run(command_line(more, full), env=env_with_devices(2), cwd=ROOT,
                        capture_output=True, text=True)
  assert cont.returncode == 0, cont.stderr[-3000:]
  assert [m['step'] for m in read_metrics(full)][-2:] == [9, 10]
  assert ckpt.restore_variables(full)[1] == 10


@pytest.mark.slow
def test_sigterm_saves_and_stops(shapes_root, tmp_path):
  overrides = {**TINY, 'data.root': shapes_root, 'num_train_steps': 10_000,
               'checkpoint_every_steps': 10_000}
  workdir = str(tmp_path)
  proc = subprocess.Popen(command_line(overrides, workdir), env=env_with_devices(2), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not any(m['step'] >= 2 for m in read_metrics(workdir)):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  _, step = ckpt.restore_variables(workdir)
  assert step >= 2 and 'Preempted' in err
