"""What the input side costs the training loop: images/s of the loop as `train.py` runs it
(prefetched host batches, `to_global`, the jitted step) against the step alone on one batch
already on the device, in the same process, interleaved.

  python -m benchmarks.train_loop [--config experiments/smoke/shapes_demo.py] [--steps 40]

Prints one JSON object; `overhead` = step-alone images/s / loop images/s - 1 (goal < 0.05).
"""

import argparse
import importlib.util
import json
import platform
import time

import jax

from retina_jax import models
from retina_jax import sharding as sharding_lib
from retina_jax import train
from retina_jax.data import pipeline


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/smoke/shapes_demo.py')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args(argv)
  config = load_config(args.config)
  mesh = sharding_lib.make_mesh(config)
  model = models.create_model(config)
  state, tx = train.create_train_state(config, model, mesh)
  step_fn = train.make_train_step(config, model, tx, mesh)
  source = pipeline.create_source(config.data, config.data.train_split)
  loader = pipeline.TrainLoader(source, config.data, config.batch_size, config.seed)
  fixed = sharding_lib.to_global(loader.batch(0), mesh)
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
  print(json.dumps({
      'config': args.config, 'batch': config.batch_size, 'image_size': config.data.image_size,
      'loop_images_per_s': rate['loop'], 'step_alone_images_per_s': rate['step_alone'],
      'overhead': rate['step_alone'] / rate['loop'] - 1,
      'device': jax.devices()[0].device_kind, 'machine': platform.machine(),
      'date': time.strftime('%Y-%m-%d')}))


if __name__ == '__main__':
  main()
