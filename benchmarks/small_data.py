"""Small-data regime: which augmentations close the gap between training-set and validation AP.

  nice -n 10 python -m benchmarks.small_data --workdir_root workdirs/small_data \
      [--steps 600] [--num_train 100] [--only flip,lsj]

Trains the demo's model and recipe (experiments/smoke/shapes_demo.py, tiny ResNet, 128 px,
AdamW) on the first `num_train` shapes training images, the same steps and batch 8 for every
variant, one variant after another, then evaluates each on the 200 validation images and on its
own training images. Appends one JSON line per variant to `<workdir_root>/results.jsonl` and
prints the table (markdown) at the end. A variant whose workdir already has both metrics files
is not re-run (and not appended again).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, 'experiments', 'smoke', 'shapes_demo.py')

PHOTOMETRIC = {'data.brightness': 0.3, 'data.contrast': 0.3, 'data.saturation': 0.3,
               'data.hue': 0.05}
OVERHEAD = {'data.random_vflip': True, 'data.random_rot90': True}
MULTISCALE = {'data.train_min_sizes': (64, 128), 'data.train_min_size_sampling': 'range'}
VARIANTS = {
    'flip': {},
    'multiscale': MULTISCALE,
    'jitter_0.5-1.5': {'data.scale_jitter': (0.5, 1.5)},
    'lsj_0.1-2.0': {'data.scale_jitter': (0.1, 2.0)},
    'photometric': PHOTOMETRIC,
    'vflip_rot90': OVERHEAD,
    'all_jitter0.5-1.5': {**MULTISCALE, 'data.scale_jitter': (0.5, 1.5), **PHOTOMETRIC,
                          **OVERHEAD},
    'all_lsj0.1-2.0': {**MULTISCALE, 'data.scale_jitter': (0.1, 2.0), **PHOTOMETRIC,
                       **OVERHEAD},
}


def _flag(key: str, value) -> str:
  if isinstance(value, tuple):
    value = '(' + ','.join(str(v) for v in value) + ')'
  return f'--config.{key}={value}'


def _run(cmd: list[str], log: str):
  with open(log, 'a') as f:
    subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir_root', default='workdirs/small_data')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--num_train', type=int, default=100)
  parser.add_argument('--only', default='', help='Comma-separated variant names; default all.')
  args = parser.parse_args()
  names = args.only.split(',') if args.only else list(VARIANTS)
  os.makedirs(args.workdir_root, exist_ok=True)
  rows = []
  for name in names:
    workdir = os.path.join(args.workdir_root, name)
    config = f'{EXPERIMENT}:steps={args.steps},batch={args.batch}'
    overrides = [_flag(k, v) for k, v in {'data.shapes_num_train': args.num_train,
                                           'num_demo_pictures': 0, **VARIANTS[name]}.items()]
    val, train = (os.path.join(workdir, f'metrics_{s}.json') for s in ('validation', 'train'))
    start = time.time()
    ran = not (os.path.exists(val) and os.path.exists(train))
    if ran:
      os.makedirs(workdir, exist_ok=True)
      log = os.path.join(workdir, 'log.txt')
      _run([sys.executable, '-m', 'retina_jax.main', '--config', config, '--workdir', workdir,
            *overrides], log)
      _run([sys.executable, '-m', 'retina_jax.evaluate', '--config', config, '--workdir', workdir,
            '--split', 'train', *overrides], log)
    metrics = {s: json.load(open(p)) for s, p in (('validation', val), ('train', train))}
    row = {'variant': name, 'overrides': overrides, 'steps': args.steps, 'batch': args.batch,
           'num_train': args.num_train, 'seconds': round(time.time() - start) if ran else 0,
           'machine': f'{platform.machine()}, {os.cpu_count()} cores',
           'date': time.strftime('%Y-%m-%d', time.gmtime()),
           **{f'{s}_{k}': round(100 * metrics[s][k], 1) for s in metrics
              for k in ('AP', 'AP50')}}
    rows.append(row)
    if ran:  # Not found from an earlier invocation.
      with open(os.path.join(args.workdir_root, 'results.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    print(json.dumps(row), flush=True)
  print('| variant | val AP | val AP50 | train AP | train AP50 | gap (train - val AP) |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['variant']} | {r['validation_AP']} | {r['validation_AP50']} | {r['train_AP']} | "
          f"{r['train_AP50']} | {round(r['train_AP'] - r['validation_AP'], 1)} |")


if __name__ == '__main__':
  main()
