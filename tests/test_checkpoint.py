"""Checkpoints under a relative workdir, as `make demo` passes one (orbax wants absolute paths)."""

import jax.numpy as jnp
import numpy as np

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
