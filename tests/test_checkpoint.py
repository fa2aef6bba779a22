"""Checkpoints under a relative workdir, as `make demo` passes one (orbax wants absolute paths),
and the best checkpoint kept by config.keep_best_by."""

import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import checkpoint as ckpt
from retina_jax import train


def test_relative_workdir_saves_restores_and_reads_variables(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = train.TrainState(step=jnp.asarray(3, jnp.int32), params={'w': jnp.arange(4.0)},
                           batch_stats={'m': jnp.ones((2,))}, opt_state={'mu': jnp.zeros((4,))},
                           first_bad_step=jnp.asarray(-1, jnp.int32))
  manager = ckpt.make_manager('workdirs/demo', keep=2, async_save=True)
  assert ckpt.save(manager, state, force=True)
  manager.wait_until_finished()
  assert (tmp_path / 'workdirs' / 'demo' / 'checkpoints' / '3').is_dir()
  restored = ckpt.restore_latest(manager, state)
  np.testing.assert_array_equal(restored.params['w'], np.arange(4.0))
  variables, step = ckpt.restore_variables('workdirs/demo')
  assert step == 3 and set(variables) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(variables['batch_stats']['m'], np.ones(2))
  assert str(ckpt.checkpoint_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'


def _state(step, w):
  return train.TrainState(step=jnp.asarray(step, jnp.int32), params={'w': jnp.full((4,), w)},
                          batch_stats={'m': jnp.ones((2,))}, opt_state={'mu': jnp.zeros((4,))},
                          first_bad_step=jnp.asarray(-1, jnp.int32))


def test_best_checkpoint_keeps_the_highest_metric_across_restarts(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='keep_best_by'):
    ckpt.restore_variables(workdir, ckpt.BEST)
  manager = ckpt.make_best_manager(workdir, 'AP')
  assert [ckpt.save_if_best(manager, 'AP', ap, _state(step, step))
          for step, ap in ((10, 0.3), (20, 0.5), (30, 0.4), (40, 0.5))] == [True, True, False, False]
  resumed = ckpt.make_best_manager(workdir, 'AP')  # A restarted run compares with the saved best.
  assert not ckpt.save_if_best(resumed, 'AP', 0.45, _state(50, 50))
  variables, step = ckpt.restore_variables(workdir, ckpt.BEST)
  assert step == 20 and set(variables) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(variables['params']['w'], np.full(4, 20.0))
  assert ckpt.save_if_best(resumed, 'AP', 0.6, _state(60, 60))
  assert ckpt.restore_variables(workdir, ckpt.BEST)[1] == 60
  assert [p.name for p in ckpt.best_dir(workdir).iterdir() if p.name.isdigit()] == ['60']


@pytest.mark.parametrize('value, step', [('', None), ('latest', None), ('best', 'best'),
                                         ('1200', 1200)])
def test_checkpoint_flag(value, step):
  assert ckpt.parse_checkpoint_flag(value) == step
  with pytest.raises(ValueError, match='step number'):
    ckpt.parse_checkpoint_flag('newest')
