"""The optimiser: learning-rate schedule, weight-decay mask and `make_optimizer`."""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from retina_jax import models

WEIGHT_DECAY_MASKS = ('kernels', 'all')


# The fields of config.optim that a fused sweep gives each member as a traced number.
TRACED_FIELDS = ('base_lr', 'weight_decay')


def _number(config: ml_collections.ConfigDict, hparams: Mapping[str, Any] | None, name: str):
  """config.optim's `name`, or its traced replacement in `hparams` (a fused-sweep member's)."""
  return (hparams or {}).get(name, config.optim[name])


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           hparams: Mapping[str, jax.Array] | None = None
                           ) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up then step decay; the base LR (hparams['base_lr'] where given) scales
  linearly with the global batch."""
  o = config.optim
  peak = _number(config, hparams, 'base_lr') * config.batch_size / o.base_batch_size
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


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   hparams: Mapping[str, jax.Array] | None = None
                   ) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay (the paper's), or AdamW with decoupled weight decay
  (`config.optim.name`); parameters frozen by `config.model.freeze_at` get no update and no
  optimiser state.

  hparams: traced values of TRACED_FIELDS replacing config.optim's (a fused-sweep member's,
  built inside its vmapped step); the optimiser state's layout does not depend on them.
  """
  o = config.optim
  weight_decay = _number(config, hparams, 'weight_decay')
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'sgd':
    parts += [
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(config)),
        optax.sgd(learning_rate_schedule(config, hparams), momentum=o.momentum),
    ]
  elif o.name == 'adamw':
    parts.append(optax.adamw(learning_rate_schedule(config, hparams), b1=o.momentum, b2=o.adam_b2,
                             weight_decay=weight_decay, mask=weight_decay_mask(config)))
  else:
    raise ValueError(f"config.optim.name must be 'sgd' or 'adamw', got {o.name!r}")
  frozen = models.frozen_mask(params, config.model.freeze_at)
  labels = jax.tree.map(lambda f: 'frozen' if f else 'train', frozen)
  return optax.multi_transform(
      {'train': optax.chain(*parts), 'frozen': optax.set_to_zero()}, labels)

