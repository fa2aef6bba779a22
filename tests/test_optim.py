"""The optimiser and LR schedule (optim.py) against hand-written first steps."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retina_jax import config as config_lib
from retina_jax import optim


def _config(**optim):
  config = config_lib.get_base_config()
  config.batch_size = 32
  config.num_train_steps = 1000
  config.optim.update(base_lr=0.01, base_batch_size=16, warmup_steps=100, warmup_factor=0.001,
                      decay_steps=(600, 800), decay_factor=0.1, weight_decay=1e-4,
                      momentum=0.9, grad_clip_norm=0.0)
  config.optim.update(optim)
  return config


PARAMS = {'backbone': {'conv1': {'kernel': jnp.full((3, 3, 1, 2), 2.0)},
                       'layer2_0': {'conv1': {'kernel': jnp.full((1, 1, 2, 2), 2.0)},
                                    'gn1': {'scale': jnp.full((2,), 2.0)}}},
          'cls_head': {'bias': jnp.full((3,), 2.0)}}
GRADS = {'backbone': {'conv1': {'kernel': jnp.full((3, 3, 1, 2), 0.5)},
                      'layer2_0': {'conv1': {'kernel': jnp.full((1, 1, 2, 2), -0.5)},
                                   'gn1': {'scale': jnp.full((2,), 0.25)}}},
         'cls_head': {'bias': jnp.full((3,), -0.25)}}


def test_schedule_warms_up_scales_with_batch_and_drops():
  lr = optim.learning_rate_schedule(_config())
  peak = 0.01 * 32 / 16
  np.testing.assert_allclose(float(lr(0)), peak * 0.001, rtol=1e-6)
  np.testing.assert_allclose(float(lr(50)), peak * (0.001 * 0.5 + 0.5), rtol=1e-6)
  np.testing.assert_allclose([float(lr(s)) for s in (100, 599, 600, 799, 800, 999)],
                             [peak, peak, peak / 10, peak / 10, peak / 100, peak / 100], rtol=1e-6)


def _first_update(config, params=PARAMS, grads=GRADS):
  tx = optim.make_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize('freeze_at', [0, 1])
def test_sgd_first_step_decays_kernels_only_and_skips_frozen(freeze_at):
  config = _config(warmup_steps=0)
  config.model.freeze_at = freeze_at
  u = _first_update(config)
  lr, wd = 0.02, 1e-4
  # Kernels: -lr (g + wd p); the GN scale and the bias: -lr g (momentum's first step is g).
  np.testing.assert_allclose(u['backbone']['layer2_0']['conv1']['kernel'], -lr * (-0.5 + wd * 2),
                             rtol=1e-6)
  np.testing.assert_allclose(u['backbone']['layer2_0']['gn1']['scale'], -lr * 0.25, rtol=1e-6)
  np.testing.assert_allclose(u['cls_head']['bias'], -lr * -0.25, rtol=1e-6)
  stem = u['backbone']['conv1']['kernel']
  if freeze_at:
    np.testing.assert_array_equal(stem, 0.0)
  else:
    np.testing.assert_allclose(stem, -lr * (0.5 + wd * 2), rtol=1e-6)


def test_adamw_first_step_is_sign_plus_decoupled_decay():
  config = _config(name='adamw', base_lr=0.001, weight_decay=0.05, warmup_steps=0)
  u = _first_update(config)
  lr, wd = 0.002, 0.05
  # Bias-corrected first moments: m / sqrt(v) = sign(g); decay lr * wd * p on kernels only.
  np.testing.assert_allclose(u['backbone']['layer2_0']['conv1']['kernel'],
                             -lr * (-1.0 + wd * 2), rtol=1e-5)
  np.testing.assert_allclose(u['backbone']['layer2_0']['gn1']['scale'], -lr * 1.0, rtol=1e-5)
  np.testing.assert_allclose(u['cls_head']['bias'], -lr * -1.0, rtol=1e-5)


def test_gradient_clipping_bounds_the_global_norm():
  config = _config(warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.1)
  u = _first_update(config)
  norm = float(optax.tree.norm(GRADS))
  assert norm > 0.1
  np.testing.assert_allclose(float(optax.tree.norm(u)), 0.02 * 0.1, rtol=1e-5)


def test_unknown_optimizer_is_a_clear_error():
  with pytest.raises(ValueError, match="optim.name must be 'sgd' or 'adamw'"):
    optim.make_optimizer(_config(name='lamb'), PARAMS)
