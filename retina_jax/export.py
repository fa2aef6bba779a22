"""Export trained parameters for evaluation and serving elsewhere.

  python -m retina_jax.export --workdir DIR --out PATH [--config ...] [--config.x=y ...]

PATH is a directory (the one format; chosen over a single file so that each part is readable
with standard tools and the parameters load without the rest):
  params.msgpack       {'params': ..., 'batch_stats': ...} as nested dicts of numpy arrays,
                       `flax.serialization.msgpack_serialize` format, no optimizer state.
  config.json          the resolved config (ml_collections to_json), enough to rebuild the
                       model with `retina_jax.models.create_model`.
  categories.json      the label <-> data set category id map with names (CategoryMap.to_json).
  detect.jax_exported  the whole detector (normalization, model, anchors, decoding, NMS)
                       serialized with `jax.export` (StableHLO): call it with
                       (variables, images, image_hw); needs jax and flax, not this code:
                         variables = flax.serialization.msgpack_restore(params.msgpack bytes)
                         detect = jax.export.deserialize(detect.jax_exported bytes)
                         out = detect.call(variables, images, image_hw)
                       images [B, S, S, 3] uint8 RGB padded with zeros at the bottom/right,
                       image_hw [B, 2] int32 valid (h, w); S as in signature.json, B any
                       (symbolic) unless exported with --batch_size. out:
                       boxes [B, D, 4] float32 (x1, y1, x2, y2) padded-image pixels,
                       scores [B, D] float32, labels [B, D] int32 contiguous,
                       category_ids [B, D] int32 data set ids, valid [B, D] bool.
  signature.json       B (null: any), S, D, the platforms the function was lowered for
                       (cpu, cuda and tpu by default), the resize rule.
"""

import functools
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from retina_jax import cli
from retina_jax import inference
from retina_jax import saved_config
from retina_jax.data.categories import CategoryMap

PARAMS_FILE = 'params.msgpack'
CATEGORIES_FILE = 'categories.json'
EXPORTED_FILE = 'detect.jax_exported'
SIGNATURE_FILE = 'signature.json'
# Lowering for a platform needs no such device here: one export serves CPU, GPU and TPU.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def to_plain(variables) -> dict:
  """Variables as nested plain dicts of numpy arrays: the tree msgpack_restore gives back."""
  state = flax.serialization.to_state_dict(variables)
  state = {k: state[k] for k in ('params', 'batch_stats') if k in state}
  return flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, state)))


def load_params(path: str) -> dict:
  """{'params', 'batch_stats'} from an export directory (or its params.msgpack file)."""
  if os.path.isdir(path):
    path = os.path.join(path, PARAMS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No exported parameters at {path}; write them with '
                            '`python -m retina_jax.export --workdir DIR --out PATH`.')
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


def load_categories(directory: str) -> CategoryMap | None:
  """The CategoryMap saved in a directory: its categories.json (an export), else the
  `categories` that training stored in its config.json (a workdir); None when neither has one."""
  path = os.path.join(directory, CATEGORIES_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return CategoryMap.from_json(f.read())
  path = os.path.join(directory, saved_config.CONFIG_JSON)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f).get('categories')
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


def torchvision_coco_v1() -> CategoryMap:
  """torchvision's COCO detection labels: label l is COCO category id l (0..90), with its names.

  torchvision's detection models predict in COCO's 91-id space (index 0 and the 10 unused ids
  are 'N/A' / '__background__'), so for them category_id = label.
  """
  try:
    from torchvision.models import detection  # pylint: disable=g-import-not-at-top
    names = detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta['categories']
  except ImportError:
    names = _TORCHVISION_COCO_NAMES
  return CategoryMap(ids=tuple(range(len(names))), names=tuple(names))


# torchvision.models.detection._meta._COCO_CATEGORIES, for when torchvision is not installed.
_TORCHVISION_COCO_NAMES = (
    '__background__', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'N/A', 'stop sign', 'parking meter',
    'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra',
    'giraffe', 'N/A', 'backpack', 'umbrella', 'N/A', 'N/A', 'handbag', 'tie', 'suitcase',
    'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'N/A', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot',
    'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'N/A',
    'dining table', 'N/A', 'N/A', 'toilet', 'N/A', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'N/A', 'book', 'clock',
    'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')


def export_detector(config, variables, categories: CategoryMap, batch_size: int = 0,
                    platforms=DEFAULT_PLATFORMS) -> jax.export.Exported:
  """The detector as a `jax.export.Exported` for [B, S, S, 3] uint8 images.

  Args:
    config: the full config; S = config.data.image_size.
    variables: as `to_plain` returns (the structure the exported function is called with).
    categories: maps the contiguous labels to data set ids inside the function.
    batch_size: B of the exported signature; 0 exports a symbolic B (any batch size).
    platforms: what to lower for, e.g. ('cpu', 'cuda', 'tpu'); the current backend when None.
  """
  detect = inference.make_detect_fn(config)
  cat_ids = np.asarray(categories.ids, np.int32)

  @jax.jit
  def serve(variables, images, image_hw):
    dets = detect(variables, images, image_hw)
    dets['category_ids'] = jnp.asarray(cat_ids)[dets['labels']]
    return dets

  s = int(config.data.image_size)
  b = batch_size if batch_size > 0 else jax.export.symbolic_shape('b')[0]
  args = (jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables),
          jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
          jax.ShapeDtypeStruct((b, 2), jnp.int32))
  kwargs = {} if platforms is None else {'platforms': tuple(platforms)}
  return jax.export.export(serve, **kwargs)(*args)


def write_export(out_dir: str, config, variables, categories: CategoryMap, batch_size: int = 0,
                 platforms=DEFAULT_PLATFORMS) -> str:
  """Writes the export directory (module docstring); returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  variables = to_plain(variables)
  exported = export_detector(config, variables, categories, batch_size, platforms)
  files = {
      PARAMS_FILE: flax.serialization.msgpack_serialize(variables),
      saved_config.CONFIG_JSON: config.to_json_best_effort(indent=2).encode(),
      CATEGORIES_FILE: categories.to_json().encode(),
      EXPORTED_FILE: bytes(exported.serialize()),
      SIGNATURE_FILE: json.dumps({
          'batch_size': batch_size or None, 'image_size': int(config.data.image_size),
          'max_detections': int(config.postprocess.max_detections),
          'platforms': list(exported.platforms),
          'resize': {'min_size': int(config.data.min_size), 'max_size': int(config.data.max_size),
                     'rule': 'scale = min(min_size / shorter side, max_size / longer side, '
                             'image_size / longer side); each side resized to '
                             'min(image_size, max(1, round(side * scale))) (bilinear), padded '
                             'bottom/right with 0 (retina_jax.data.pipeline.preprocess)'},
      }, indent=2).encode(),
  }
  for name, data in files.items():
    tmp = os.path.join(out_dir, name + '.tmp')
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, os.path.join(out_dir, name))  # No half-written file under the real name.
  return out_dir


def _define_flags():
  """Flags exist only when this module is the program, so importing it defines none."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'Config file; default: DIR/config.json.', lock_config=True),
      'workdir': flags.DEFINE_string('workdir', '', 'Training directory (newest checkpoint).'),
      'out': flags.DEFINE_string('out', '', 'Export directory to write.'),
      'batch_size': flags.DEFINE_integer('batch_size', 0, 'Batch size of the serialized '
                                         'detector; 0: any (symbolic).'),
      'platforms': flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                                     'Platforms to lower the detector for.'),
  }


def main(fl, argv):
  del argv
  if not fl['workdir'].value or not fl['out'].value:
    raise app.UsageError('--workdir and --out are required.')
  from retina_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = fl['config'].value
  variables, step = checkpoint.restore_variables(fl['workdir'].value)
  categories = resolve_categories(config, fl['workdir'].value)
  write_export(fl['out'].value, config, variables, categories, fl['batch_size'].value,
               fl['platforms'].value)
  logging.info('Exported step %d of %s to %s', step, fl['workdir'].value, fl['out'].value)
  print(f'Exported step {step} of {fl["workdir"].value} to {fl["out"].value}')


def run():
  fl = _define_flags()
  argv = saved_config.with_saved_config(sys.argv, saved_config.flag_value(sys.argv, 'workdir'))
  app.run(functools.partial(main, fl), argv=argv, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
