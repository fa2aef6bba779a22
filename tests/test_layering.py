"""Layering: the entry points (main, evaluate, export, predict) sit on top; no library module and
no experiment file imports one, at module level or inside a function."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = frozenset(f'retina_jax.{m}' for m in ('main', 'evaluate', 'export', 'predict'))


def imported_modules(source: str, module: str) -> set[str]:
  """Every module `source` (the text of module `module`, dotted) imports, absolute and dotted;
  `from P import n` counts as P and as P.n, since n may be a module."""
  package = module.split('.')[:-1]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = package[:len(package) - node.level + 1] if node.level else []
      parent = '.'.join(base + ([node.module] if node.module else []))
      found.add(parent)
      found.update(f'{parent}.{alias.name}' for alias in node.names)
  return found


def _library_modules():
  """(path, dotted module) of every module under retina_jax/ and experiments/ but the entry
  points."""
  for folder in ('retina_jax', 'experiments'):
    for path in sorted((ROOT / folder).rglob('*.py')):
      module = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
      if module not in ENTRY_POINTS:
        yield path, module


def test_the_scan_sees_every_form_of_import():
  assert imported_modules('from retina_jax import export as e', 'retina_jax.data.x') >= {
      'retina_jax.export'}
  assert 'retina_jax.evaluate' in imported_modules(
      'def f():\n  from .. import evaluate\n', 'retina_jax.evaluation.evaluator')
  assert 'retina_jax.predict' in imported_modules('import retina_jax.predict', 'experiments.x')
  assert 'retina_jax.main' in imported_modules('from retina_jax.main import run', 'retina_jax.x')


def test_library_modules_import_no_entry_point():
  modules = list(_library_modules())
  assert len(modules) > 30 and any(m == 'retina_jax.train' for _, m in modules)
  bad = {str(path.relative_to(ROOT)): sorted(imported_modules(path.read_text(), m) & ENTRY_POINTS)
         for path, m in modules}
  bad = {path: entry for path, entry in bad.items() if entry}
  assert not bad, (f'Library modules import entry points: {bad}; move what they need into a '
                   'library module (an entry point only parses flags and calls the library).')


def test_importing_the_library_changes_no_process_setting():
  """Only entry points choose the platform (`cli.skip_absent_tpu`) and epath's gs:// backend is
  chosen by the first `fileio.Path`: importing sets no environment variable and no jax option.
  Checks a few modules that once did or that every entry point imports, not all of them."""
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'EPATH_USE_TF')}
  code = ('import os, jax\n'
          'before = dict(os.environ), jax.config.jax_platforms\n'
          'import retina_jax, retina_jax.cli, retina_jax.fileio, retina_jax.metrics\n'
          'assert (dict(os.environ), jax.config.jax_platforms) == before\n'
          'retina_jax.fileio.Path("gs://bucket/x")\n'
          'assert os.environ["EPATH_USE_TF"] == "false"\n')
  subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, check=True, timeout=120)
