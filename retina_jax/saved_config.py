"""What a training directory or an export saved, read back: the config, the category map, the
parameters.

A saved config.json as an ml_collections config file, so saved configs take overrides too.

`evaluate`, `export` and `predict` accept the same `--config.x=y` overrides as training, and
ml_collections applies overrides only to a config that came from a `--config=FILE[:ARG]` flag.
When the command line names no `--config`, `with_saved_config(argv, path)` inserts
`--config=<this file>:<path>/config.json`, and this file's `get_config` rebuilds the config.

Rebuilding starts from `get_base_config()` and takes every value of the JSON on top, so that
fields stay typed as in the base config (JSON turns tuples into lists; an override of a tuple
field then still parses as a tuple); fields the base config does not know are kept as saved.
"""

import json
import os

import flax.serialization
import ml_collections

from retina_jax import fileio
from retina_jax.config import get_base_config
from retina_jax.data.categories import CategoryMap

CONFIG_JSON = 'config.json'
PARAMS_FILE = 'params.msgpack'
CATEGORIES_FILE = 'categories.json'


def _merge(base: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if key in base and isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(base[key], value)
    elif key in base and isinstance(base[key], tuple) and isinstance(value, list):
      base[key] = tuple(value)
    elif key in base and isinstance(base[key], float) and isinstance(value, int):
      base[key] = float(value)
    else:
      with base.unlocked():
        # Replaces, rather than assigns, so that a saved value of another type than the base
        # default (an experiment's own choice) is kept instead of rejected.
        if key in base:
          del base[key]
        base[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def load(path: str) -> ml_collections.ConfigDict:
  """The config saved at `path`: a config.json file, or a directory holding one."""
  if fileio.Path(path).is_dir():
    path = str(fileio.Path(path) / CONFIG_JSON)
  try:
    saved = json.loads(fileio.Path(path).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f'No saved config at {path}; pass --config=experiments/<file>.py '
                            'as for training.') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None
  config = get_base_config()
  _merge(config, saved)
  return config


def get_config(path: str) -> ml_collections.ConfigDict:
  """ml_collections entry point: `--config=retina_jax/saved_config.py:<path>`."""
  return load(path)


def with_saved_config(argv: list[str], path: str) -> list[str]:
  """argv with `--config=<this file>:<path>` inserted, unless argv names a --config or no path."""
  if not path or any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    return list(argv)
  return [argv[0], f'--config={os.path.abspath(__file__)}:{path}'] + list(argv[1:])


def flag_value(argv: list[str], name: str) -> str:
  """The value of `--name=v` or `--name v` in argv ('' when absent), read before absl parses."""
  for k, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and k + 1 < len(argv):
      return argv[k + 1]
  return ''


def config_dir(argv: list[str]) -> str:
  """Where evaluate, export and predict take the config from when argv names no --config: the
  --workdir when it holds a config.json, else the folder of --params (an export), else --workdir."""
  workdir = flag_value(argv, 'workdir')
  if workdir and (fileio.Path(workdir) / CONFIG_JSON).exists():
    return workdir
  return export_dir(flag_value(argv, 'params')) or workdir


def export_dir(params: str) -> str:
  """The folder of exported parameters given as the folder or as a file in it ('' for '').

  Absolute, so that a bare file name (`--params params.msgpack`, run inside the export) still
  names its folder (os.path.dirname would give '').
  """
  if not params:
    return ''
  path = fileio.Path(fileio.absolute(params))
  return str(path if path.is_dir() else path.parent)


def load_params(path: str) -> dict:
  """{'params', 'batch_stats'} from an export directory (or its params.msgpack file), or from a
  parameters file of another name (as scripts/convert_torchvision.py writes); an export that
  `retina_jax.export` did not finish writing (no `fileio.COMPLETE`) counts as absent."""
  folder = export_dir(path)
  is_export = fileio.Path(path).is_dir() or fileio.Path(path).name == PARAMS_FILE
  path = str(fileio.Path(folder) / PARAMS_FILE) if fileio.Path(path).is_dir() else path
  if not fileio.Path(path).exists():
    raise FileNotFoundError(f'No exported parameters at {path}; write them with '
                            '`python -m retina_jax.export --workdir DIR --out PATH`.')
  if is_export and not fileio.is_complete(folder):
    raise FileNotFoundError(f'The export {folder} is incomplete (no {fileio.COMPLETE} file: its '
                            'writing was interrupted); export again with `python -m '
                            'retina_jax.export --workdir DIR --out PATH`.')
  return flax.serialization.msgpack_restore(fileio.Path(path).read_bytes())


def load_categories(directory: str) -> CategoryMap | None:
  """The CategoryMap saved in a directory: its categories.json (an export), else the
  `categories` that training stored in its config.json (a workdir); None when neither has one."""
  path = fileio.Path(directory) / CATEGORIES_FILE
  if path.exists():
    return CategoryMap.from_json(path.read_text())
  path = fileio.Path(directory) / CONFIG_JSON
  if path.exists():
    stored = json.loads(path.read_text()).get('categories')
    if stored:
      return CategoryMap.from_json(stored)
  return None


def resolve_categories(config, *directories: str, source=None) -> CategoryMap:
  """The label <-> category id map a model was trained with.

  In order: `config.categories` (the JSON training stores in its config, or an experiment's own
  map such as torchvision's 91 ids), the map saved in the first directory that has one
  (`load_categories`: an export's categories.json or a workdir's config.json, so that a
  `--config experiments/...` given to evaluate or export still labels with the training
  data's ids), the categories of `source`, the categories of the config's eval split.
  """
  if config.get('categories'):
    return CategoryMap.from_json(config.categories)
  for d in directories:
    if d and (cats := load_categories(d)) is not None:
      return cats
  if source is None:
    from retina_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    source = pipeline.create_source(config.data, config.data.eval_split)
  return source.categories
