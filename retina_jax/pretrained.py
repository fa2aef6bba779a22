"""Initialisation from converted weights (`config.init_from`): what the file has overwrites the
fresh variables."""

import logging
from typing import Any

import flax
import numpy as np

from retina_jax import convert
from retina_jax import fileio


def load(variables: dict[str, Any], path: str) -> dict[str, Any]:
  """Overwrites every variable that the converted file has with the same path and shape.

  What the file lacks, or has with another shape (a class head for another number of classes),
  keeps its initialisation, as detectron2 does when fine-tuning; every such path is logged, so
  a wrong file cannot pass silently as 'nothing loaded'.
  """
  if not fileio.Path(path).exists():
    raise FileNotFoundError(f'config.init_from={path!r} does not exist; make it with '
                            'scripts/convert_torchvision.py')
  loaded = flax.traverse_util.flatten_dict(convert.load_variables(path), sep='/')
  ours = flax.traverse_util.flatten_dict(variables, sep='/')
  mismatched = sorted(k for k, v in loaded.items()
                      if k in ours and tuple(np.shape(v)) != tuple(ours[k].shape))
  for key in mismatched:
    del loaded[key]
  merged, not_loaded, unused = convert.restore_into(
      variables, flax.traverse_util.unflatten_dict(loaded, sep='/'))
  logging.info('init_from %s: loaded %d arrays; initialised afresh: %s; shape mismatch (kept '
               'fresh): %s; unused in the file: %s', path, len(ours) - len(not_loaded),
               ', '.join(not_loaded) or 'none', ', '.join(mismatched) or 'none',
               ', '.join(unused) or 'none')
  if len(not_loaded) == len(ours):
    raise ValueError(f'config.init_from={path!r}: no array matched the model; is it a file '
                     'written by scripts/convert_torchvision.py for this backbone?')
  return merged
