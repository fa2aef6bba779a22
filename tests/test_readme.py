"""The README's commands do not rot: every command in its code blocks names an entry point that
exists, passes only flags that entry point defines, and a config (experiment file, argument and
--config.x=y overrides) that builds; the cheap ones run.

What this leaves out: the commands that train, evaluate, export, predict or plan for a pod are
not run here (their own tests run each of them on a tiny model: test_train, test_eval,
test_export*, test_predict, test_pod_plan); `python -c` snippets, `docker`, `tfds` and `gsutil`
lines are not checked.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from retina_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Placeholder values the README writes where a user puts their own.
PLACEHOLDER_KEYS = {'x'}  # --config.x=y
SHELL_ENDS = ('|', '||', '&&', ';', 'do', 'then')


def readme_commands() -> list[tuple[str, list[str], str]]:
  """(entry point, its arguments, the line) for every command in the README's code blocks;
  an entry point is `retina_jax.X` / `tests.X` / `pytest` (run with -m), a `scripts/*.py`, or
  `scripts/launch_pod.sh` (its own options: those before `--`)."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  commands = []
  for block in re.findall(r'```[a-z]*\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      line = re.sub(r'(^|\s)#.*', '', line).strip()
      if not re.search(r'python\S*\s+(-m\s|scripts/)|launch_pod\.sh', line):
        continue
      try:
        tokens = shlex.split(line)
      except ValueError:  # An opening `python -c "`.
        continue
      for i, token in enumerate(tokens):
        if token == '-m' and i + 1 < len(tokens):
          entry, args = tokens[i + 1], tokens[i + 2:]
        elif token.endswith('launch_pod.sh'):
          entry, args = 'scripts/launch_pod.sh', tokens[i + 1:]
          args = args[:args.index('--')] if '--' in args else args
        elif re.search(r'python\d?$', token) and i + 1 < len(tokens) and tokens[i + 1].endswith(
            '.py'):
          entry, args = tokens[i + 1], tokens[i + 2:]
        else:
          continue
        for j, arg in enumerate(args):
          if arg in SHELL_ENDS or arg.endswith(';'):
            args = args[:j] + ([arg[:-1]] if arg.endswith(';') and arg != ';' else [])
            break
        if entry in ('-c',):
          continue
        commands.append((entry, args, line))
  return commands


def _options(args: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
  """(--name, value) pairs and positional arguments; `[...]` around optional parts and `...`
  dropped. A value after a separate `--name` is counted as a positional (harmless here)."""
  options, positional = [], []
  for arg in args:
    arg = arg.strip('[]')
    if not arg or arg == '...':
      continue
    if arg.startswith('--'):
      name, _, value = arg[2:].partition('=')
      options.append((name, value if _ else None))
    else:
      positional.append(arg)
  return options, positional


_ABSL_FLAGS = r'''
import importlib, json, sys
from absl import flags
out = {}
for name in sys.argv[1:]:
  before = set(flags.FLAGS)
  module = importlib.import_module(name)
  if hasattr(module, '_define_flags'):
    module._define_flags()
  new = set(flags.FLAGS) - before
  out[name] = {n: flags.FLAGS[n].boolean for n in new}
  for n in new:
    delattr(flags.FLAGS, n)
print(json.dumps(out))
'''


def _argparse_options(path: str) -> dict[str, bool]:
  with open(os.path.join(ROOT, path)) as f:
    source = f.read()
  return {m: False for m in re.findall(r"add_argument\(\s*'--([\w-]+)'", source)}


def _shell_options(path: str) -> dict[str, bool]:
  with open(os.path.join(ROOT, path)) as f:
    return {m: False for m in re.findall(r'^\s+--([\w-]+)\)', f.read(), re.M)}


@pytest.fixture(scope='module')
def commands():
  found = readme_commands()
  assert len(found) >= 15, found  # The extraction itself works.
  return found


@pytest.fixture(scope='module')
def defined(commands):
  """Flag names (-> whether boolean) of every entry point the README runs."""
  modules = sorted({e for e, _, _ in commands if e.startswith('retina_jax.')})
  out = subprocess.run([sys.executable, '-c', _ABSL_FLAGS, *modules], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  names = json.loads(out.stdout.strip().splitlines()[-1])
  for entry, _, _ in commands:
    if entry.endswith('.py'):
      names[entry] = _argparse_options(entry)
    elif entry.endswith('.sh'):
      names[entry] = _shell_options(entry)
    elif entry.startswith(('tests.', 'retina_jax.')):  # Some take argparse options.
      names[entry] = {**names.get(entry, {}),
                      **_argparse_options(entry.replace('.', '/') + '.py')}
  return names


def test_every_readme_command_names_an_entry_point_and_only_its_flags(commands, defined):
  problems = []
  for entry, args, line in commands:
    if entry == 'pytest':
      _, files = _options(args)
      problems += [f'{line}: no {p}' for p in files if not os.path.exists(os.path.join(ROOT, p))]
      continue
    if entry.endswith(('.py', '.sh')) and not os.path.exists(os.path.join(ROOT, entry)):
      problems.append(f'{line}: no {entry}')
      continue
    if entry not in defined:
      problems.append(f'{line}: unknown entry point {entry}')
      continue
    flags = defined[entry]
    for name, _ in _options(args)[0]:
      if name.startswith('config.'):
        ok = 'config' in flags
      else:
        ok = name in flags or (name.startswith('no') and flags.get(name[2:]) is True)
      if not ok:
        problems.append(f'{line}: {entry} has no flag --{name}')
  assert not problems, '\n'.join(problems)


def _config_of(args: list[str]) -> tuple[str, list[str]] | None:
  """The --config spec and the --config.x=y overrides of one command, or None without one."""
  spec, overrides = None, []
  for i, arg in enumerate(args):
    arg = arg.strip('[]')
    if arg == '--config' and i + 1 < len(args):
      spec = args[i + 1].strip('[]')
    elif arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith('--config.') and '=' in arg:
      key = arg[len('--config.'):].split('=')[0]
      if key not in PLACEHOLDER_KEYS:
        overrides.append(arg)
  if spec is None or not spec.startswith('experiments/'):
    return None  # No config, or a placeholder (`--config ...`).
  return spec, overrides


def test_every_readme_config_builds_with_its_overrides(commands):
  checked = 0
  for entry, args, line in commands:
    found = _config_of(args)
    if found is None:
      continue
    spec, overrides = found
    try:
      config = config_lib.from_flags(spec, overrides)
    except Exception as e:  # pylint: disable=broad-exception-caught
      pytest.fail(f'{line}\n  --config {spec} {" ".join(overrides)}: {e!r}')
    for override in overrides:
      key, value = override[len('--config.'):].split('=', 1)
      node = config
      for part in key.split('.'):
        node = node[part]
      assert str(node) == value or node == type(node)(value), (line, key, node)
    checked += 1
  assert checked >= 8, checked


def test_the_config_examples_in_entry_points_help_build():
  """`--config` help texts give examples a user copies (main.py's did not parse once)."""
  examples = []
  for path in ('retina_jax/main.py', 'retina_jax/evaluate.py', 'retina_jax/tools/pod_plan.py'):
    with open(os.path.join(ROOT, path)) as f:
      examples += re.findall(r"'(experiments/[\w/]+\.py(?::[\w=,.]+)?)'", f.read())
  assert examples
  for spec in examples:
    config_lib.from_flags(spec)


def test_the_readme_sweep_dry_run_runs(commands):
  runs = [(e, a) for e, a, _ in commands if e == 'scripts/sweep.py' and '--dry-run' in a]
  assert runs
  for entry, args in runs:
    out = subprocess.run([sys.executable, entry, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'gamma' in out.stdout, out.stdout[-2000:]
