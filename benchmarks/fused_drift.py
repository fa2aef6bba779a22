"""Per-step losses of a fused sweep's members against their separate runs, and the controls that
tell a bug from float chaos.

  python -m benchmarks.fused_drift [--experiment experiments/smoke/shapes_demo.py:steps=200]
      [--steps 40] [--members 2,4] [--modes alone,traced,perturbed,fused] [--json OUT]

For the chosen members of the experiment's `get_sweep` (indices), on the same host batches:
  alone      `train.make_train_step` of the member's own config (gamma etc. static);
  traced     the same step with the member's numbers traced (`fused.hparams`), not vmapped:
             the fused step's formulas (exp(gamma log(1 - p_t)), a traced learning rate)
             without the member axis;
  perturbed  alone, from initial parameters each scaled by (1 + 1e-7 u), u ~ N(0, 1): a change
             of about one float32 rounding, the control for how much rounding is amplified;
  fused      every member of the sweep in one vmapped step (`fused.make_train_step`).
Prints, per member and mode, the largest relative loss difference from `alone` up to steps
5, 10, 20, ... and writes every per-step loss to --json.
"""

import argparse
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.fused_sweep import _members
from retina_jax import fused
from retina_jax import models
from retina_jax import optim
from retina_jax import sharding as sharding_lib
from retina_jax import train
from retina_jax.data import pipeline


def _losses(step_fn, state, batches, *args):
  out = []
  for batch in batches:
    state, metrics = step_fn(state, batch, *args)
    out.append(np.asarray(jax.device_get(metrics['loss'])))
  return np.stack(out)  # [steps] or [steps, M].


def _perturbed(state, seed=1):
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x * (1 + 1e-7 * jax.random.normal(k, x.shape, x.dtype)) for x, k in zip(leaves, keys)]
  return state.replace(params=jax.tree.unflatten(tree, leaves))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--experiment', default='experiments/smoke/shapes_demo.py:steps=200')
  parser.add_argument('--set', action='append', default=[], help='a.b=value for every member')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--members', default='', help='indices into the sweep; default all')
  parser.add_argument('--modes', default='alone,traced,perturbed,fused')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', force=True)
  configs, names = _members(args.experiment, args.set)
  chosen = [int(i) for i in args.members.split(',')] if args.members else range(len(configs))
  modes = args.modes.split(',')
  config = configs[0]
  mesh = sharding_lib.make_mesh(config)
  source = pipeline.create_source(config.data, config.data.train_split)
  configs = [train.with_categories(c, source.categories) for c in configs]
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed)
  batches = [sharding_lib.to_global(train.train_inputs(loader.batch(s)), mesh)
             for s in range(args.steps)]
  model = models.create_model(configs[0], mesh)
  losses = {}
  for i in chosen:
    c = configs[i]
    for mode in ('alone', 'traced', 'perturbed'):
      if mode not in modes:
        continue
      state, tx = train.create_train_state(c, model, mesh)
      if mode == 'perturbed':
        state = _perturbed(state)
      if mode == 'traced':
        numbers = {k: jnp.asarray(v[0]) for k, v in fused.hparams([c]).items()}
        step_fn = jax.jit(lambda s, b, h, c=c: train.train_step(
            s, b, model=model, config=c, tx=optim.make_optimizer(c, s.params, h),
            hparams=h), donate_argnums=(0,))
        losses[(names[i], mode)] = _losses(step_fn, state, batches, numbers)
      else:
        losses[(names[i], mode)] = _losses(train.make_train_step(c, model, tx, mesh), state,
                                           batches)
      logging.info('%s %s done', names[i], mode)
  if 'fused' in modes:
    state, _ = train.create_train_state(configs[0], model, mesh)
    states = fused.stack([state] * len(configs), mesh)
    numbers = jax.device_put(fused.hparams(configs), sharding_lib.member_sharding(mesh))
    all_losses = _losses(fused.make_train_step(configs[0], model, mesh), states, batches,
                         numbers)
    for i in chosen:
      losses[(names[i], 'fused')] = all_losses[:, i]
  checkpoints = [s for s in (1, 2, 3, 5, 10, 20, 30, 40, 50, 80, 100) if s <= args.steps]
  print('largest relative loss difference from alone, up to step ' +
        ' '.join(str(s) for s in checkpoints))
  for i in chosen:
    ref = losses.get((names[i], 'alone'))
    for mode in modes:
      if mode == 'alone' or ref is None:
        continue
      rel = np.abs(losses[(names[i], mode)] - ref) / np.abs(ref)
      print(f'{names[i]:32s} {mode:10s} ' +
            ' '.join(f'{rel[:s].max():.1e}' for s in checkpoints), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({f'{n} {m}': v.tolist() for (n, m), v in losses.items()}, f, indent=1)


if __name__ == '__main__':
  main()
