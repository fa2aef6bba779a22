"""Expands an experiment file's `get_sweep(hyper)` into one training run per setting.

  python scripts/sweep.py experiments/focal_sweep.py[:arg] [--dry-run] [--workdir_root DIR]
      [--fused] [--pod NAME --zone ZONE]
      [-- extra flags for every run, e.g. --config.num_train_steps=100]

Each run gets its own workdir, DIR/<experiment>[:<arg>]/<setting name>[,<extra overrides>], and
the same command as a single run plus the setting's `--config.x=y` overrides; re-running the
sweep resumes every run. The experiment argument and the `--config.x=y` flags after `--` are
part of the workdir name, so that a sweep with other ones (more steps, another optimiser) starts
its own runs instead of resuming, or re-evaluating, the runs of the first. Finished runs (final
checkpoint and the evaluation after it written) are skipped; `python -m retina_jax.evaluate
--workdir DIR` evaluates one again.
Without --dry-run the runs go one after another on this machine; with --pod they are printed
(or launched) as scripts/launch_pod.sh commands for a TPU pod.

--fused trains the runs in this one process instead, side by side in one program where their
configs differ only in numbers (`retina_jax.fused`; --dry-run prints how they group), with the
same workdirs and the same skipping and resuming, and ends with the table of every run's AP,
also written to DIR/<experiment>[:<arg>]/summary.md. On several hosts (a TPU pod: through
scripts/launch_pod.sh) every host runs the same command with retina_jax.main's multi-process
flags after -- (--distributed, or --coordinator_address, --num_processes and --process_id), and
it ends with retina_jax.main's exit codes (README, "Exit codes").
"""

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys

from etils import epath

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from retina_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from retina_jax import fileio  # pylint: disable=g-import-not-at-top
from retina_jax import hyper  # pylint: disable=g-import-not-at-top


def load_sweep(spec: str) -> list[dict]:
  try:
    return config_lib.load_sweep(spec)
  except ValueError as e:  # No get_sweep: one line, no traceback.
    raise SystemExit(str(e)) from e


# Longer workdir names are shortened with a hash: most file systems allow 255 bytes a name.
_MAX_NAME = 200


def _safe_name(name: str) -> str:
  name = name.replace('/', '-')
  if len(name) <= _MAX_NAME:
    return name
  digest = hashlib.sha256(name.encode()).hexdigest()[:12]
  return f'{name[:_MAX_NAME - 13]}~{digest}'


def run_name(setting: dict, extra: list[str]) -> str:
  """The setting's name followed by the `--config.x=y` overrides among `extra`, which change
  the run as much as the setting does; other flags (e.g. --coordinator_address) do not."""
  overrides = []
  for i, a in enumerate(extra):
    if a.startswith('--config.'):
      if '=' not in a and i + 1 < len(extra) and not extra[i + 1].startswith('--'):
        a = f'{a}={extra[i + 1]}'  # --config.x y
      overrides.append(a.removeprefix('--config.'))
  return _safe_name(','.join(filter(None, [hyper.setting_name(setting), *overrides])))


def experiment_dir(spec: str, workdir_root: str) -> epath.Path:
  path, _, arg = spec.partition(':')
  return fileio.Path(workdir_root) / _safe_name(
      os.path.splitext(os.path.basename(path))[0] + (f':{arg}' if arg else ''))


def commands(spec: str, workdir_root: str, extra: list[str], python: str) -> list[tuple[str, list[str]]]:
  runs = []
  for setting in load_sweep(spec):
    workdir = str(experiment_dir(spec, workdir_root) / run_name(setting, extra))
    cmd = [python, '-m', 'retina_jax.main', f'--config={spec}', f'--workdir={workdir}',
           *hyper.to_flags(setting), *extra]
    runs.append((workdir, cmd))
  return runs


def finished_step(workdir: str) -> int | None:
  """The last step of a finished run in `workdir` (local or gs://): its config.json's
  num_train_steps has a committed checkpoint and the final evaluation's
  metrics_<eval split>.json is newer. None otherwise (also for workdirs this machine cannot
  read, e.g. on a pod's local disks)."""
  try:
    workdir = fileio.Path(workdir)
    config = json.loads((workdir / 'config.json').read_text())
    step = int(config['num_train_steps'])
    # Orbax's last file of a step, local and on gs:// (where a step has no folder to stat).
    committed = workdir / 'checkpoints' / str(step) / 'commit_success.txt'
    metrics = workdir / f"metrics_{config['data']['eval_split']}.json"
    if metrics.stat().mtime >= committed.stat().mtime:
      return step
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return None


def split_fused_flags(extra: list[str]) -> tuple[list[str], list[str]]:
  """`extra` (the flags after --) as (its --config.x=y overrides, the other flags), each flag
  with its value where that is the next argument (`--config.x y`, `--num_processes 2`)."""
  overrides, others = [], []
  i = 0
  while i < len(extra):
    flag = extra[i:i + 1]
    if '=' not in extra[i] and i + 1 < len(extra) and not extra[i + 1].startswith('-'):
      flag = extra[i:i + 2]
    (overrides if extra[i].startswith('--config.') else others).extend(flag)
    i += len(flag)
  return overrides, others


def run_fused(spec: str, workdir_root: str, extra: list[str], dry_run: bool):
  """Every setting's config as its own command would build it, trained by `fused.run_sweep`;
  on every host of a multi-process run (the multi-process flags of retina_jax.main among
  `extra`), ending as retina_jax.main ends (`hosts.run`'s exit codes)."""
  # Imported here: the other modes only print or launch commands and need no jax.
  from absl import flags  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from retina_jax import cli  # pylint: disable=g-import-not-at-top
  from retina_jax import fused  # pylint: disable=g-import-not-at-top
  from retina_jax import hosts  # pylint: disable=g-import-not-at-top
  cli.skip_absent_tpu()
  extra, others = split_fused_flags(extra)
  distributed = cli.define_distributed_flags()
  try:
    unparsed = flags.FLAGS([sys.argv[0], *others])[1:]
  except flags.Error as e:
    unparsed = [str(e)]
  if unparsed:
    raise SystemExit(f'--fused takes --config.x=y flags and the multi-process flags of '
                     f"retina_jax.main (--{', --'.join(distributed)}) after --, not: "
                     f'{unparsed[0]}')
  # Training's progress lines; orbax's several lines per checkpoint come through absl's logger.
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      force=True)  # absl, imported with jax, installed a handler of its own.
  logging.getLogger('absl').setLevel(logging.WARNING)
  members = {}  # By workdir: a setting listed twice (Table 1a's and 1b's CE run) trains once.
  for setting, (workdir, _) in zip(load_sweep(spec),
                                   commands(spec, workdir_root, extra, sys.executable)):
    members.setdefault(workdir, setting)
  workdirs = list(members)
  configs = config_lib.sweep_configs(spec, list(members.values()), extra)
  if dry_run:  # Reads the workdirs and prints; needs no other host.
    skip = [finished_step(w) is not None for w in workdirs]
    _print_skipped(workdirs, skip)
    todo = [i for i, s in enumerate(skip) if not s]
    groups, why = fused.plan([configs[i] for i in todo], [workdirs[i] for i in todo])
    print(f'{why}:\n' + '\n'.join(
        f'  group {g + 1}: ' + ', '.join(fileio.Path(workdirs[todo[j]]).name for j in group)
        for g, group in enumerate(groups)), flush=True)
    return
  hosts.initialize(**{name: holder.value for name, holder in distributed.items()})
  logging.info('JAX process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())

  def work():
    # Process 0's reading of the workdirs: every host then trains the same members.
    skip = [bool(s) for s in fused.agreed([finished_step(w) is not None for w in workdirs])]
    _print_skipped(workdirs, skip)
    fused.run_sweep(configs, workdirs, str(experiment_dir(spec, workdir_root)), skip)

  hosts.run(work, distributed['host_timeout_seconds'].value)


def _print_skipped(workdirs: list[str], skip: list[bool]):
  for workdir, skipped in zip(workdirs, skip):
    print(f'{workdir}{": finished and evaluated, skipped" if skipped else ""}', flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('experiment', help='experiments/<file>.py[:arg]')
  parser.add_argument('--dry-run', action='store_true', help='print the runs, start nothing')
  parser.add_argument('--workdir_root', default='workdirs')
  parser.add_argument('--fused', action='store_true',
                      help='train the runs in this process (one per host), in one program '
                      'where they can be')
  parser.add_argument('--pod', default='', help='TPU VM name: run through scripts/launch_pod.sh')
  parser.add_argument('--zone', default='')
  argv = sys.argv[1:] if argv is None else list(argv)
  # Split by hand: argparse rejects `-- --config.x=y` after options once the positional
  # argument is taken, and would read flags of the training command as its own.
  extra = argv[argv.index('--') + 1:] if '--' in argv else []
  args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  if args.fused:
    if args.pod:
      raise SystemExit('--fused runs on this machine; --pod launches separate runs only')
    run_fused(args.experiment, args.workdir_root, extra, args.dry_run)
    return
  python = sys.executable if not args.pod else 'python3'
  runs = commands(args.experiment, args.workdir_root, extra, python)
  launcher = os.path.join(os.path.dirname(__file__), 'launch_pod.sh')
  for i, (workdir, cmd) in enumerate(runs):
    if args.pod:
      cmd = ['bash', launcher, '--name', args.pod, '--zone', args.zone,
             *(['--dry-run'] if args.dry_run else []), '--', *cmd[1:]]
    step = finished_step(workdir)
    if step is not None:
      print(f'[{i + 1}/{len(runs)}] {workdir}\n  finished at step {step} and evaluated: skipped',
            flush=True)
      continue
    print(f'[{i + 1}/{len(runs)}] {workdir}\n  {shlex.join(cmd)}', flush=True)
    if args.dry_run and not args.pod:
      continue
    result = subprocess.run(cmd, check=False)
    if result.returncode:
      raise SystemExit(f'run {workdir} failed with exit code {result.returncode}; re-run the '
                       'sweep to resume it and the ones after it')


if __name__ == '__main__':
  main()
