"""What survives what: kills during asynchronous saves, damaged checkpoints, an unwritable
workdir. Small train states written by the real checkpoint code; the real training runs are in
test_resume.py and test_train_distributed.py."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import checkpoint as ckpt
from retina_jax import run_control
from retina_jax import train


def state_at(step: int) -> train.TrainState:
  """A train state whose every array is a function of `step`, so that a restore can be checked
  bitwise against the step it claims to be."""
  rng = np.random.default_rng(step)
  arrays = lambda n: {f'w{i}': jnp.asarray(rng.standard_normal((64, 64 + i)), jnp.float32)
                      for i in range(n)}
  return train.TrainState(step=jnp.asarray(step, jnp.int32), params=arrays(3),
                          batch_stats=arrays(1), opt_state=arrays(3),
                          first_bad_step=jnp.asarray(-1, jnp.int32))


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def array_files(directory) -> list[str]:
  """The array data files of a checkpoint (ocdbt.process_*/d/*). Which arrays share a file varies
  from save to save, so damaging one file may leave the model variables that evaluation reads
  intact: all of them are damaged."""
  return [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names
          if os.path.basename(d) == 'd' and 'ocdbt.process_' in d]


@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
    tmp_path, caplog, damage):
  workdir = str(tmp_path)
  manager = ckpt.make_manager(workdir, keep=3)
  for step in (1, 2, 3):
    ckpt.save(manager, state_at(step))
    manager.wait_until_finished()
  victims = array_files(tmp_path / 'checkpoints' / '3')
  assert victims
  for victim in victims:
    if damage == 'truncate':
      with open(victim, 'r+b') as f:
        f.truncate(os.path.getsize(victim) // 2)
    else:
      os.remove(victim)

  with caplog.at_level(logging.WARNING):
    variables, step = ckpt.restore_variables(workdir)  # Evaluation and export.
  assert step == 2
  assert_same(variables['params'], state_at(2).params)
  warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Checkpoint step')]
  assert len(warnings) == 1 and 'step 3 at ' + str(tmp_path / 'checkpoints' / '3') in warnings[0]
  caplog.clear()

  manager = ckpt.make_manager(workdir, keep=3)  # A resumed run.
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(manager, state_at(0))
  assert_same(restored, state_at(2))
  [warning] = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Checkpoint step')]
  assert 'step 3 at ' in warning and 'resuming from step 2' in warning
  assert (tmp_path / 'checkpoints' / '3.damaged').is_dir()  # Kept for a look, out of the way:
  ckpt.save(manager, state_at(3))  # the step it held can be saved again.
  manager.wait_until_finished()
  assert_same(ckpt.restore_latest(ckpt.make_manager(workdir, keep=3), state_at(0)), state_at(3))


def test_no_readable_checkpoint_stops_naming_each_and_moves_nothing(tmp_path):
  workdir = str(tmp_path)
  manager = ckpt.make_manager(workdir, keep=3)
  for step in (1, 2):
    ckpt.save(manager, state_at(step))
    manager.wait_until_finished()
    for victim in array_files(tmp_path / 'checkpoints' / str(step)):
      os.remove(victim)
  with pytest.raises(ckpt.DamagedCheckpointError,
                     match=r'step 2 at \S+/checkpoints/2: .*step 1 at \S+/checkpoints/1: '):
    ckpt.restore_latest(ckpt.make_manager(workdir, keep=3), state_at(0))
  with pytest.raises(ckpt.DamagedCheckpointError, match='step 2 at .*step 1 at '):
    ckpt.restore_variables(workdir)
  # Left in place: a re-run must not start afresh silently.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


# One process imports jax once and forks a child per trial (its backend not yet started, so
# the fork is clean); the child resumes from the newest checkpoint, checks it bitwise against
# the step it claims, and saves the next step asynchronously; the parent kills it with SIGKILL
# `delay` seconds after the save started, the delays spread evenly over 1.5 save windows.
# About 0.3 s a trial.
KILL_SCRIPT = r'''
import json, os, signal, sys, time
import numpy as np
from retina_jax import checkpoint as ckpt
from tests.test_reliability import state_at

workdir, trials = sys.argv[1], int(sys.argv[2])


def child(out):
  import jax
  manager = ckpt.make_manager(workdir, keep=2)
  restored = ckpt.restore_latest(manager, state_at(0))
  step = 0 if restored is None else int(restored.step)
  exact = restored is None or all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(restored), jax.tree.leaves(state_at(step))))
  new = jax.block_until_ready(state_at(step + 1))
  os.write(out, f'{step} {int(exact)}\n'.encode())
  start = time.monotonic()
  ckpt.save(manager, new)
  manager.wait_until_finished()
  os.write(out, f'{time.monotonic() - start}\n'.encode())


def trial(delay):
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r)
    try:
      child(w)
      os._exit(0)
    except BaseException as e:
      os.write(w, f'error {e!r}'.replace('\n', ' ')[:2000].encode() + b'\n')
      os._exit(1)
  os.close(w)
  with os.fdopen(r) as f:
    first = f.readline().split()
    if first and first[0] != 'error' and delay is not None:
      time.sleep(delay)
      os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    rest = f.read().split()
  if not first or first[0] == 'error':
    return {'error': ' '.join(first + rest)}
  return {'delay': delay, 'restored': int(first[0]), 'exact': bool(int(first[1])),
          'save_s': float(rest[0]) if rest else None}


# The window of a save that follows a killed one: it includes removing the killed one's files.
results = [trial(None)]
results += [trial(results[0]['save_s'] / 2), trial(None)]
window = results[-1]['save_s']
results += [trial(1.5 * window * i / (trials - 1)) for i in range(trials)]


def a_kill_came_after_a_save():
  return any(after['restored'] > before['restored']
             for before, after in zip(results[3:], results[4:]))


# On a loaded machine a save can take longer than 1.5 windows measured a moment before (a CI
# run saw all 24 kills land before their saves completed): kill later and later until one
# lands after its save, so that the kills cover both sides of the window.
for factor in (3, 6, 12, 24):
  if a_kill_came_after_a_save():
    break
  results.append(trial(factor * window))
results.append(trial(None))
print(json.dumps({'window': window, 'results': results,
                  'left': sorted(os.listdir(os.path.join(workdir, 'checkpoints')))}))
'''


@pytest.mark.slow
def test_sigkill_during_asynchronous_saves_resumes_from_the_newest_complete_checkpoint(tmp_path):
  import json, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.test_train import ROOT, env_with_devices  # pylint: disable=g-import-not-at-top
  trials = 24
  out = subprocess.run([sys.executable, '-c', KILL_SCRIPT, str(tmp_path), str(trials)],
                       env=env_with_devices(1), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  results = report['results']
  assert not [r for r in results if 'error' in r], results
  # Every resume read exactly the step it found, never a partial checkpoint ...
  assert all(r['exact'] for r in results)
  # ... and lost at most the save that was killed: one checkpoint period.
  for before, after in zip(results, results[1:]):
    finished = before['save_s'] is not None
    assert after['restored'] in ((before['restored'] + 1,) if finished else
                                 (before['restored'], before['restored'] + 1)), (before, after)
  killed = results[3:-1]
  # The kills landed across the window: some before the save completed, some after.
  advanced = [r['restored'] > b['restored'] for b, r in zip(killed, killed[1:] + results[-1:])]
  assert sum(advanced) >= 1 and advanced.count(False) >= 5, killed
  # Orbax's temporary folders of killed saves are cleaned up on the next start.
  assert all(name.isdigit() for name in report['left']), report['left']


def _mount(*args) -> bool:
  import subprocess  # pylint: disable=g-import-not-at-top
  return subprocess.run(['mount', *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder that refuses writes: a read-only bind mount as root (for whom chmod changes
  nothing), a chmod 555 folder otherwise."""
  path = tmp_path / 'read_only'
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    yield path
    path.chmod(0o755)
  elif _mount('--bind', str(path), str(path)):
    try:
      if not _mount('-o', 'remount,ro,bind', str(path)):
        pytest.skip('cannot remount read-only here')
      yield path
    finally:
      _mount_undo(path)
  else:
    pytest.skip('root without mount permission: no way to make a read-only folder')


def _mount_undo(path):
  import subprocess  # pylint: disable=g-import-not-at-top
  subprocess.run(['umount', str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs (root with mount permission only)."""
  path = tmp_path / 'small'
  path.mkdir()
  if os.geteuid() != 0 or not _mount('-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(path)):
    pytest.skip('needs root with mount permission for a small filesystem')
  try:
    yield path
  finally:
    _mount_undo(path)


def test_read_only_workdir_stops_at_start_up_naming_it(read_only_dir, tmp_path):
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(str(tmp_path / 'shapes'))
  for workdir in (read_only_dir, read_only_dir / 'run'):  # Existing, or to be made.
    with pytest.raises(run_control.WorkdirError, match=f'--workdir {workdir} .*another --workdir'):
      train.train_and_evaluate(config, str(workdir))


def test_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(small_disk):
  workdir = str(small_disk / 'run')
  manager = ckpt.make_manager(workdir, keep=3)
  ckpt.save(manager, state_at(1))
  ckpt.wait_until_saved(manager)
  with open(small_disk / 'filler', 'wb', buffering=0) as f:
    with pytest.raises(OSError):
      while True:
        f.write(b'\0' * 65536)
  with pytest.raises(ckpt.CheckpointWriteError) as e:
    ckpt.save(manager, state_at(2))
    ckpt.wait_until_saved(manager)
  message = str(e.value)
  assert '\n' not in message and f'in {small_disk}/run/checkpoints: ' in message
  assert 'newest intact one is step 1' in message
  os.remove(small_disk / 'filler')  # Space again: the resumed run finds step 1 whole.
  assert_same(ckpt.restore_latest(ckpt.make_manager(workdir, keep=3), state_at(0)), state_at(1))


def test_a_failed_evaluation_names_the_image_and_keeps_the_step_it_evaluated(tmp_path):
  from retina_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(str(tmp_path / 'shapes'), num_train_steps=4, eval_every_steps=3,
                       checkpoint_every_steps=2)
  source = pipeline.create_source(config.data, config.data.eval_split)
  bad = os.path.join(source.image_dir, source.file_names[0])
  with open(bad, 'wb') as f:
    f.write(b'not an image')
  workdir = str(tmp_path / 'run')
  with pytest.raises(run_control.EvaluationError, match=f'at step 3 .*{bad}.*checkpoint step 3 is '
                     'saved'):
    train.train_and_evaluate(config, workdir)
  assert ckpt.restore_variables(workdir)[1] == 3  # Not 2, the last periodic checkpoint.
