"""A fused sweep against the same members run one after another, in the same process.

  python -m benchmarks.fused_sweep [--experiment experiments/smoke/shapes_demo.py:steps=200]
      [--workdir_root /tmp/fused_bench] [--set num_train_steps=100 ...] [--json OUT]

Trains the experiment's `get_sweep` (the demo's is Table 1b on shapes: 5 members) first fused
(`fused.run_sweep`, one program), then each member alone (`train.train_and_evaluate`), from
fresh workdirs. Reports per mode the wall clock, and per member the steady images/s (the mean of
metrics.jsonl's images_per_second, compilation excluded), its first logged losses and its AP;
`outside_steps_s` = wall clock - steps x the steady step time, i.e. start-up, compilation,
input waits, checkpoints and evaluation, which is what fusing shares between the members.
"""

import argparse
import json
import logging
import os
import shutil
import time

import jax

from benchmarks.train_loop import apply_overrides
from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax import fused
from retina_jax import hyper
from retina_jax import metrics as metrics_lib
from retina_jax import train


def _members(spec: str, overrides: list[str]):
  path, _, arg = spec.partition(':')
  module = config_lib.load_experiment(path)
  configs, names = [], []
  for setting in module.get_sweep(hyper):
    config = module.get_config(arg or None)
    for key, value in setting.items():
      config_lib.set_by_path(config, key.removeprefix('config.'), value)
    apply_overrides(config, overrides)
    configs.append(config)
    names.append(hyper.setting_name(setting))
  return configs, names


def _read(workdir: str, split: str) -> dict:
  records = metrics_lib.read_records(workdir)
  train_records = [r for r in records if 'train/loss' in r]
  rates = [r['train/images_per_second'] for r in train_records
           if 'train/images_per_second' in r]
  with open(os.path.join(workdir, f'metrics_{split}.json')) as f:
    ap = json.load(f)['AP']
  return {'images_per_second': sum(rates) / len(rates) if rates else None,
          'first_losses': [r['train/loss'] for r in train_records[:3]], 'AP': ap}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--experiment', default='experiments/smoke/shapes_demo.py:steps=200')
  parser.add_argument('--workdir_root', default='/tmp/fused_bench')
  parser.add_argument('--set', action='append', default=[], help='a.b=value for every member')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)
  configs, names = _members(args.experiment, args.set)
  shutil.rmtree(args.workdir_root, ignore_errors=True)
  steps, batch = configs[0].num_train_steps, configs[0].batch_size
  split = configs[0].data.eval_split
  fused_dirs = [os.path.join(args.workdir_root, 'fused', n) for n in names]
  start = time.perf_counter()
  fused.run_sweep(configs, fused_dirs, os.path.join(args.workdir_root, 'fused'))
  fused_wall = time.perf_counter() - start
  alone_walls, alone_dirs = [], [os.path.join(args.workdir_root, 'alone', n) for n in names]
  for config, workdir in zip(configs, alone_dirs):
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    alone_walls.append(time.perf_counter() - start)
  members = []
  for name, f_dir, a_dir, a_wall in zip(names, fused_dirs, alone_dirs, alone_walls):
    members.append({'member': name, 'fused': _read(f_dir, split), 'alone': _read(a_dir, split),
                    'alone_wall_s': a_wall})
  fused_ips = members[0]['fused']['images_per_second']
  result = {
      'experiment': args.experiment, 'overrides': args.set, 'device': jax.devices()[0].device_kind,
      'num_members': len(names), 'steps': steps, 'batch_size': batch,
      'fused_wall_s': fused_wall, 'alone_wall_s': sum(alone_walls),
      'fused_images_per_second_per_member': fused_ips,
      'fused_outside_steps_s': fused_wall - steps * batch / fused_ips,
      'alone_outside_steps_s': sum(
          w - steps * batch / m['alone']['images_per_second']
          for w, m in zip(alone_walls, members)),
      'members': members,
  }
  text = json.dumps(result, indent=2)
  print(text, flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
