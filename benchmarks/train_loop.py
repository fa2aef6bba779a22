"""What the input side costs the training loop: images/s of the loop as `train.py` runs it
(prefetched host batches, `to_global`, the jitted step) against the step alone on one batch
already on the device, in the same process, interleaved.

  python -m benchmarks.train_loop [--config experiments/smoke/shapes_demo.py] [--steps 40]
      [--set model.backbone=resnet50 --set data.image_size=512 ...] [--peak_tflops 989]

Prints one JSON object; `overhead` = step-alone images/s / loop images/s - 1 (goal < 0.05).
`mfu` = the step's FLOPs (XLA's cost analysis of the compiled step, a multiply-add counted as
2) x steps / loop time / the device's peak: `--peak_tflops`, or for known accelerators the
dense bf16 peak of `_PEAK_TFLOPS` (null on CPUs and unknown devices).
"""

import argparse
import ast
import json
import platform
import time

import jax

from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax import models
from retina_jax import sharding as sharding_lib
from retina_jax import train
from retina_jax.data import pipeline


# Dense bf16 peak TFLOP/s per chip, by jax device_kind (vendor data sheets).
_PEAK_TFLOPS = {
    'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA A100-SXM4-80GB': 312.0,
    'NVIDIA A100-SXM4-40GB': 312.0, 'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5': 459.0,
}


def apply_overrides(config, pairs):
  """'a.b=value' pairs onto the config; values parse as Python literals, else stay strings."""
  for pair in pairs:
    key, _, text = pair.partition('=')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    config_lib.set_by_path(config, key, value)
  return config


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  return config_lib.load_experiment(path).get_config(arg or None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/smoke/shapes_demo.py')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--set', action='append', default=[], help="config override 'a.b=v'")
  parser.add_argument('--peak_tflops', type=float, default=None)
  args = parser.parse_args(argv)
  config = apply_overrides(load_config(args.config), args.set)
  mesh = sharding_lib.make_mesh(config)
  model = models.create_model(config)
  state, tx = train.create_train_state(config, model, mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  source = pipeline.create_source(config.data, config.data.train_split)
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed)
  fixed = sharding_lib.to_global(loader.batch(0), mesh)
  step_fn = step_fn.lower(state, fixed).compile()  # Compiled once, run and costed.
  cost = step_fn.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step_flops = float(cost.get('flops', 0.0)) if cost else 0.0
  state, metrics = step_fn(state, fixed)
  jax.block_until_ready(metrics)

  def step_alone(state):
    for _ in range(args.steps):
      state, metrics = step_fn(state, fixed)
    jax.block_until_ready(metrics)
    return state

  def loop(state, start):
    batches = loader.iterate(start)
    for _ in range(args.steps):
      state, metrics = step_fn(state, sharding_lib.to_global(next(batches), mesh))
    jax.block_until_ready(metrics)
    return state

  times = {'step_alone': [], 'loop': []}
  for r in range(args.rounds):
    t0 = time.perf_counter()
    state = step_alone(state)
    times['step_alone'].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    state = loop(state, 1 + r * args.steps)
    times['loop'].append(time.perf_counter() - t0)
  rate = {k: config.batch_size * args.steps / min(v) for k, v in times.items()}
  device = jax.devices()[0].device_kind
  peak = args.peak_tflops or _PEAK_TFLOPS.get(device)
  achieved = step_flops * args.steps / min(times['loop'])  # FLOP/s of the whole loop.
  print(json.dumps({
      'config': args.config, 'overrides': args.set, 'batch': config.batch_size,
      'image_size': config.data.image_size,
      'loop_images_per_s': rate['loop'], 'step_alone_images_per_s': rate['step_alone'],
      'overhead': rate['step_alone'] / rate['loop'] - 1,
      'step_gflops': step_flops / 1e9, 'loop_tflops_per_s': achieved / 1e12,
      'mfu': achieved / (peak * 1e12 * jax.device_count()) if peak and step_flops else None,
      'device': device, 'devices': jax.device_count(), 'machine': platform.machine(),
      'date': time.strftime('%Y-%m-%d')}))


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
