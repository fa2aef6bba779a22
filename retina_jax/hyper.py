"""Sweep building blocks for experiment files' `get_sweep(hyper)` (big_vision style).

A sweep is a list of settings; a setting maps a config path ('config.loss.gamma') to a value.
"""

import itertools
from typing import Any, Sequence

Setting = dict[str, Any]


def sweep(name: str, values: Sequence[Any]) -> list[Setting]:
  return [{name: v} for v in values]


def fixed(name: str, value: Any) -> list[Setting]:
  return [{name: value}]


def product(sweeps: Sequence[list[Setting]]) -> list[Setting]:
  """Every combination, the first sweep varying slowest."""
  return [{k: v for s in combo for k, v in s.items()} for combo in itertools.product(*sweeps)]


def zipit(sweeps: Sequence[list[Setting]]) -> list[Setting]:
  """Settings side by side: the i-th of each sweep together (all must have the same length)."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f'zipit needs sweeps of equal length, got {sorted(lengths)}')
  return [{k: v for s in combo for k, v in s.items()} for combo in zip(*sweeps)]


def chainit(sweeps: Sequence[list[Setting]]) -> list[Setting]:
  """One sweep after the other."""
  return [s for sw in sweeps for s in sw]


def setting_name(setting: Setting) -> str:
  """A workdir-safe name: 'loss.gamma=2,loss.alpha=0.25' with tuples joined by '_'."""
  def fmt(v):
    if isinstance(v, (tuple, list)):
      return '_'.join(fmt(x) for x in v)
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)
  parts = [f"{k.removeprefix('config.')}={fmt(v)}" for k, v in setting.items()]
  return ','.join(parts).replace('/', '-')


def to_flags(setting: Setting) -> list[str]:
  """Command-line overrides for `python -m retina_jax.main` (tuples written as '(a,b)')."""
  def fmt(v):
    if isinstance(v, (tuple, list)):
      return '(' + ','.join(repr(float(x)) if isinstance(x, float) else str(x) for x in v) + \
          (',)' if len(v) == 1 else ')')
    return str(v)
  return [f'--{k}={fmt(v)}' for k, v in setting.items()]
