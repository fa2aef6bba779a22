"""The optimiser: learning-rate schedule, weight-decay mask and `make_optimizer`."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from retina_jax import models

WEIGHT_DECAY_MASKS = ('kernels', 'all')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up then step decay; the base LR scales linearly with the global batch."""
  o = config.optim
  peak = o.base_lr * config.batch_size / o.base_batch_size
  boundaries = jnp.asarray(o.decay_steps or (config.num_train_steps + 1,), jnp.int32)

  def schedule(step):
    if o.warmup_steps > 0:
      alpha = jnp.minimum(step / o.warmup_steps, 1.0)
      warm = o.warmup_factor * (1.0 - alpha) + alpha
    else:
      warm = 1.0
    drops = jnp.sum(step >= boundaries)
    return peak * warm * o.decay_factor ** drops

  return schedule


def weight_decay_mask(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """params -> bool tree of the parameters that decay (config.optim.weight_decay_mask): conv and
  dense kernels only, not norm scales and biases ('kernels', as detectron2), or every one
  ('all', as torchvision's reference scripts)."""
  kind = config.optim.weight_decay_mask
  if kind not in WEIGHT_DECAY_MASKS:
    raise ValueError(f'config.optim.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, '
                     f'got {kind!r}')
  return lambda params: jax.tree.map(lambda p: kind == 'all' or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay (the paper's), or AdamW with decoupled weight decay
  (`config.optim.name`); parameters frozen by `config.model.freeze_at` get no update and no
  optimiser state."""
  o = config.optim
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'sgd':
    parts += [
        optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask(config)),
        optax.sgd(learning_rate_schedule(config), momentum=o.momentum),
    ]
  elif o.name == 'adamw':
    parts.append(optax.adamw(learning_rate_schedule(config), b1=o.momentum, b2=o.adam_b2,
                             weight_decay=o.weight_decay, mask=weight_decay_mask(config)))
  else:
    raise ValueError(f"config.optim.name must be 'sgd' or 'adamw', got {o.name!r}")
  frozen = models.frozen_mask(params, config.model.freeze_at)
  labels = jax.tree.map(lambda f: 'frozen' if f else 'train', frozen)
  return optax.multi_transform(
      {'train': optax.chain(*parts), 'frozen': optax.set_to_zero()}, labels)

