"""Exact resume after a killed process, restore on another device count, and SIGTERM: real
training processes, in their own file so that pytest-xdist runs them beside test_train.py."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from retina_jax import checkpoint as ckpt
from tests.test_train import (ROOT, TINY, command_line, env_with_devices, finished_checkpoints,
                              read_metrics)


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def saving(workdir: str) -> bool:
  return any('orbax-checkpoint-tmp' in d for d in os.listdir(os.path.join(workdir, 'checkpoints')))


# Every augmentation that draws per example, so that resuming must reproduce its draws too.
AUGMENTED = {'data.train_min_sizes': (96, 128), 'data.scale_jitter': (0.3, 2.0),
             'data.random_vflip': True, 'data.random_rot90': True, 'data.brightness': 0.3,
             'data.contrast': 0.3, 'data.saturation': 0.3, 'data.hue': 0.05}


@pytest.mark.slow
def test_killed_run_resumes_bitwise_and_restores_on_other_device_counts(shapes_root, tmp_path):
  overrides = {**TINY, **AUGMENTED, 'data.root': shapes_root, 'num_train_steps': 8}
  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  subprocess.run(command_line(overrides, full), env=env_with_devices(4), check=True, cwd=ROOT,
                 capture_output=True)

  proc = subprocess.Popen(command_line(overrides, killed), env=env_with_devices(4), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Killed while an asynchronous save is being written (its temporary folder is there), after
  # an earlier checkpoint completed.
  kill_after = int(np.random.default_rng().integers(3, 7))
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (any(m['step'] >= kill_after for m in read_metrics(killed)) and
        finished_checkpoints(killed) and saving(killed)):
      break
    time.sleep(0.005)
  assert proc.poll() is None, 'the run ended before it could be killed'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_before_resume = [m['step'] for m in read_metrics(killed)]
  resumed = subprocess.run(command_line(overrides, killed), env=env_with_devices(4), cwd=ROOT,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed' in resumed.stderr
  # Resumed at the last checkpoint (a multiple of 2): what the killed run logged after it is
  # dropped, so metrics.jsonl has every step exactly once.
  assert max(steps_before_resume) > 2
  assert [m['step'] for m in read_metrics(killed)] == list(range(1, 9))

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
def test_sigterm_saves_stops_and_exits_143(shapes_root, tmp_path):
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
  # Non-zero, so that a scheduler restarts it; only after the save completed.
  assert proc.returncode == 143, err[-3000:]
  _, step = ckpt.restore_variables(workdir)
  assert step >= 2 and f'Preempted: saved step {step}' in err
