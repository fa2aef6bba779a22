"""Command-line parsing shared by the entry points (main, export, evaluate, predict)."""

import re
import sys

from absl import app


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
