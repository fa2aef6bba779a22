"""Expands an experiment file's `get_sweep(hyper)` into one training run per setting.

  python scripts/sweep.py experiments/focal_sweep.py[:arg] [--dry-run] [--workdir_root DIR]
      [--pod NAME --zone ZONE] [-- extra flags for every run]

Each run gets its own workdir, DIR/<experiment>/<setting name>, and the same command as a
single run plus the setting's `--config.x=y` overrides; re-running the sweep resumes every run.
Without --dry-run the runs go one after another on this machine; with --pod they are printed
(or launched) as scripts/launch_pod.sh commands for a TPU pod.
"""

import argparse
import inspect
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from retina_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from retina_jax import hyper  # pylint: disable=g-import-not-at-top


def load_sweep(spec: str) -> list[dict]:
  path, _, arg = spec.partition(':')
  module = config_lib.load_experiment(path)
  if not hasattr(module, 'get_sweep'):
    raise SystemExit(f'{path} defines no get_sweep(hyper)')
  get_sweep = module.get_sweep
  takes_arg = len(inspect.signature(get_sweep).parameters) > 1
  return get_sweep(hyper, arg or None) if takes_arg else get_sweep(hyper)


def commands(spec: str, workdir_root: str, extra: list[str], python: str) -> list[tuple[str, list[str]]]:
  experiment = os.path.splitext(os.path.basename(spec.partition(':')[0]))[0]
  runs = []
  for setting in load_sweep(spec):
    workdir = os.path.join(workdir_root, experiment, hyper.setting_name(setting))
    cmd = [python, '-m', 'retina_jax.main', f'--config={spec}', f'--workdir={workdir}',
           *hyper.to_flags(setting), *extra]
    runs.append((workdir, cmd))
  return runs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('experiment', help='experiments/<file>.py[:arg]')
  parser.add_argument('--dry-run', action='store_true', help='print the runs, start nothing')
  parser.add_argument('--workdir_root', default='workdirs')
  parser.add_argument('--pod', default='', help='TPU VM name: run through scripts/launch_pod.sh')
  parser.add_argument('--zone', default='')
  parser.add_argument('extra', nargs='*', help='flags passed to every run (after --)')
  args = parser.parse_args(argv)
  python = sys.executable if not args.pod else 'python3'
  runs = commands(args.experiment, args.workdir_root, args.extra, python)
  launcher = os.path.join(os.path.dirname(__file__), 'launch_pod.sh')
  for i, (workdir, cmd) in enumerate(runs):
    if args.pod:
      cmd = ['bash', launcher, '--name', args.pod, '--zone', args.zone,
             *(['--dry-run'] if args.dry_run else []), '--', *cmd[1:]]
    print(f'[{i + 1}/{len(runs)}] {workdir}\n  {shlex.join(cmd)}', flush=True)
    if args.dry_run and not args.pod:
      continue
    result = subprocess.run(cmd, check=False)
    if result.returncode:
      raise SystemExit(f'run {workdir} failed with exit code {result.returncode}; re-run the '
                       'sweep to resume it and the ones after it')


if __name__ == '__main__':
  main()
