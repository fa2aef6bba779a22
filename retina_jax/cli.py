"""What the entry points share: the platform choice, and command-line parsing (main, export,
evaluate, predict, tools, scripts/sweep.py)."""

import functools
import importlib.util
import re
import sys
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from retina_jax import saved_config


def skip_absent_tpu():
  """Chooses the CPU where the TPU runtime is installed but no TPU chip is attached.

  With the TPU runtime installed (requirements-tpu.txt: the tests and pod_plan compile for TPU
  topologies) but no TPU chip here, jax would still start a TPU backend on every run, and libtpu
  prints five lines of errors (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) before jax falls back
  to the CPU. Every entry point calls this first, before any backend starts; importing the
  package chooses nothing. An explicit JAX_PLATFORMS, a TPU VM, or an installed GPU plugin
  (jax_plugins) leave jax's own choice alone.
  """
  if importlib.util.find_spec('libtpu') is None or importlib.util.find_spec('jax_plugins'):
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_platforms and not hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    jax.config.update('jax_platforms', 'cpu')


def _message(error: BaseException) -> str:
  """The innermost message: ml_collections raises AttributeError(KeyError(message))."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else ''


def _unknown_field(message: str) -> str:
  """The field name in ml_collections' "'name'\\nDid you mean ..." lookup error ('' if none)."""
  match = re.match(r"""^['"]*([^'"\n]+)['"]*""", message)
  return match.group(1) if match else ''


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`), where a --config.x=y
  override of a field the config does not have stops with one line that names the flag.

  ml_collections looks the field up with getattr while parsing, so such a typo otherwise ends in
  a 40-line AttributeError traceback whose last line is only the quoted field name.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = _message(e)
    field = _unknown_field(message)
    culprits = [a for a in argv[1:] if a.startswith('--config.') and field in
                a.split('=', 1)[0].removeprefix('--config.').split('.')]
    if not field or not culprits:
      raise  # Not an override's error (e.g. an experiment file's own bug): keep the traceback.
    hint = ' '.join(message.splitlines()[1:])
    path = culprits[0].split('=', 1)[0].removeprefix('--config.')
    sys.stderr.write(f'FATAL Flags parsing error: {culprits[0]}: the config has no field '
                     f'{path!r}. {hint + " " if hint else ""}Only the fields of the config '
                     'can be overridden (see retina_jax/config.py).\n')
    sys.exit(1)


def define_distributed_flags() -> dict[str, flags.FlagHolder]:
  """The multi-process flags of the training commands (retina_jax.main, scripts/sweep.py
  --fused), by name: `hosts.initialize(**{name: holder.value ...})` takes them."""
  return {
      'coordinator_address': flags.DEFINE_string(
          'coordinator_address', '', 'host:port of process 0 for multi-process runs outside a '
          'TPU pod (CPU/GPU clusters).'),
      'num_processes': flags.DEFINE_integer('num_processes', 1, 'With --coordinator_address.'),
      'process_id': flags.DEFINE_integer('process_id', 0, 'With --coordinator_address.'),
      'distributed': flags.DEFINE_bool(
          'distributed', False, 'Call jax.distributed.initialize() with what the environment '
          'says (TPU pods, SLURM).'),
      'host_timeout_seconds': flags.DEFINE_integer(
          'host_timeout_seconds', 120, 'Multi-process runs: how long a process may show no '
          'sign of life before every other one stops with exit code 75, naming it. A process '
          'that fails says so at once: the others stop within seconds, naming it, with exit '
          'code 1.'),
  }


def define_config_flag(default: str):
  """--config of evaluate, export and predict; `default` says which saved config.json is used
  when it is not given (`saved_config.config_dir`)."""
  return config_flags.DEFINE_config_file('config', None, f'Config file; default: {default}.',
                                         lock_config=True)


def define_checkpoint_flag():
  """--checkpoint of evaluate and export; `checkpoint.parse_checkpoint_flag` reads it."""
  return flags.DEFINE_string('checkpoint', 'latest', "Which checkpoint of --workdir: 'latest' "
                             "(the newest), 'best' (the one config.keep_best_by kept) or a step "
                             'number.')


def define_params_flag():
  return flags.DEFINE_string('params', '', 'Export directory (python -m retina_jax.export) or '
                             'its params.msgpack.')


def run_with_saved_config(main: Callable[[dict, list[str]], None],
                          define_flags: Callable[[], dict]):
  """Runs `main(flags, argv)` of evaluate, export or predict.

  The flags of `define_flags()` are defined only now, so that importing such a module defines
  none; without a --config the saved config of `saved_config.config_dir` is the config, so that
  `--config.x=y` overrides apply to it too.
  """
  skip_absent_tpu()
  fl = define_flags()
  argv = saved_config.with_saved_config(sys.argv, saved_config.config_dir(sys.argv))
  app.run(functools.partial(main, fl), argv=argv, flags_parser=parse_flags)
