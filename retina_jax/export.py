"""Export trained parameters for evaluation and serving elsewhere.

  python -m retina_jax.export --workdir DIR --out PATH [--checkpoint latest|best|STEP]
      [--format jax|torchvision|saved_model] [--platforms cpu,cuda,tpu] [--config ...]
      [--config.x=y ...]

PATH is a directory (chosen over a single file so that each part is readable with standard
tools and the parameters load without the rest). --format jax (the default) writes:
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
                       images [B, S, S, 3] uint8 RGB (float32 under config.data.resize=
                       'torchvision') padded with zeros at the bottom/right,
                       image_hw [B, 2] int32 valid (h, w); S as in signature.json, B any
                       (symbolic) unless exported with --batch_size. out:
                       boxes [B, D, 4] float32 (x1, y1, x2, y2) padded-image pixels,
                       scores [B, D] float32, labels [B, D] int32 contiguous,
                       category_ids [B, D] int32 data set ids, valid [B, D] bool.
  detect_{H}x{W}.jax_exported
                       the same detector for each canvas evaluation pads into
                       (config.data.eval_buckets='orientation': landscape and portrait,
                       e.g. 800x1344 and 1344x800), images [B, H, W, 3]: what `evaluate` and
                       `predict` compute, where the S x S detector sees more padding.
  signature.json       B (null: any), S, D, the platforms the functions were lowered for
                       (cpu, cuda and tpu by default), the resize rule, and 'canvases': for
                       'landscape' (width >= height) and 'portrait' images the file, H and W.

--format torchvision writes what torchvision's own RetinaNet loads (`convert.to_torchvision`;
configs torchvision has no model for stop with one line naming the field):
  model.pth            the state dict, `torch.save`d: load it with strict=True into
  torchvision.json     {'builder': 'retinanet_resnet50_fpn' or '..._v2', 'kwargs': {num_classes,
                       min_size, max_size, image_mean, image_std, score_thresh, nms_thresh,
                       detections_per_img, topk_candidates}}:
                         model = getattr(torchvision.models.detection, builder)(
                             weights=None, weights_backbone=None, **kwargs)
  categories.json      as above: torchvision's label l is category ids[l], called names[l].

--format saved_model writes a TF SavedModel whose serving signature takes one uint8 image of any
size and returns its detections in its own pixels (retina_jax/saved_model.py), plus
categories.json.

Every folder is complete when its COMPLETE file is there (`fileio.publish`: written last, and
removed first when an export is written again); `saved_config.load_params` refuses a folder
without it, as an interrupted export, local or on gs://, has none.
"""

import io
import json
import sys

from absl import app
from absl import flags
from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import cli
from retina_jax import convert
from retina_jax import fileio
from retina_jax import inference
from retina_jax import saved_config
from retina_jax import saved_model
from retina_jax import sizes
from retina_jax.data import canvas as canvas_lib
from retina_jax.data import resize
from retina_jax.data.categories import CategoryMap

EXPORTED_FILE = 'detect.jax_exported'
SIGNATURE_FILE = 'signature.json'
TORCHVISION_WEIGHTS = 'model.pth'
TORCHVISION_JSON = 'torchvision.json'
FORMATS = ('jax', 'torchvision', 'saved_model')
# Lowering for a platform needs no such device here: one export serves CPU, GPU and TPU.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def to_plain(variables) -> dict:
  """Variables as nested plain dicts of numpy arrays: the tree msgpack_restore gives back."""
  state = flax.serialization.to_state_dict(variables)
  state = {k: state[k] for k in ('params', 'batch_stats') if k in state}
  return flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, state)))


def export_detector(config, variables, categories: CategoryMap, batch_size: int = 0,
                    platforms=DEFAULT_PLATFORMS, canvas=None) -> jax.export.Exported:
  """The detector as a `jax.export.Exported` for [B, H, W, 3] images (uint8, float32 under
  config.data.resize='torchvision': `resize.image_dtype`).

  Args:
    config: the full config.
    variables: as `to_plain` returns (the structure the exported function is called with).
    categories: maps the contiguous labels to data set ids inside the function.
    batch_size: B of the exported signature; 0 exports a symbolic B (any batch size).
    platforms: what to lower for, e.g. ('cpu', 'cuda', 'tpu'); the current backend when None.
    canvas: (H, W); (S, S), S = config.data.image_size, when None. The anchors are constants
      for it, so every canvas is its own function.
  """
  detect = inference.make_detect_fn(config)
  cat_ids = np.asarray(categories.ids, np.int32)

  @jax.jit
  def serve(variables, images, image_hw):
    dets = detect(variables, images, image_hw)
    dets['category_ids'] = jnp.asarray(cat_ids)[dets['labels']]
    return dets

  s = int(config.data.image_size)
  h, w = (s, s) if canvas is None else canvas
  b = batch_size if batch_size > 0 else jax.export.symbolic_shape('b')[0]
  args = (jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables),
          jax.ShapeDtypeStruct((b, h, w, 3), resize.image_dtype(config.data)),
          jax.ShapeDtypeStruct((b, 2), jnp.int32))
  kwargs = {} if platforms is None else {'platforms': tuple(platforms)}
  return jax.export.export(serve, **kwargs)(*args)


def write_export(out_dir: str, config, variables, categories: CategoryMap, batch_size: int = 0,
                 platforms=DEFAULT_PLATFORMS) -> str:
  """Writes the export directory (module docstring); returns its path."""
  s = int(config.data.image_size)
  detectors = {EXPORTED_FILE: (s, s)}
  canvases = {}
  for images, (h, w) in canvas_lib.eval_canvases(config.data).items():
    name = EXPORTED_FILE if (h, w) == (s, s) else f'detect_{h}x{w}.jax_exported'
    detectors[name] = (h, w)
    canvases[images] = {'file': name, 'height': h, 'width': w}
  if not canvases:
    logging.warning('config.data.eval_buckets=%r pads each image into a canvas of its own size; '
                    'the export holds the %dx%d detector only (signature.json canvases {}).',
                    config.data.eval_buckets, s, s)
  variables = to_plain(variables)
  exported = {name: export_detector(config, variables, categories, batch_size, platforms, hw)
              for name, hw in detectors.items()}
  files = {
      saved_config.PARAMS_FILE: flax.serialization.msgpack_serialize(variables),
      saved_config.CONFIG_JSON: config.to_json_best_effort(indent=2).encode(),
      saved_config.CATEGORIES_FILE: categories.to_json().encode(),
      **{name: bytes(e.serialize()) for name, e in exported.items()},
      SIGNATURE_FILE: json.dumps({
          'batch_size': batch_size or None, 'image_size': s,
          'max_detections': int(config.postprocess.max_detections),
          'platforms': list(exported[EXPORTED_FILE].platforms),
          'canvases': canvases,
          'resize': {'min_size': int(config.data.min_size), 'max_size': int(config.data.max_size),
                     'name': config.data.resize,
                     'rule': resize.RESIZE_RULES[config.data.resize] + '; padded bottom/right '
                             'with 0 (retina_jax.data.preprocess)'},
      }, indent=2).encode(),
  }
  fileio.publish(out_dir, files)
  return out_dir


def write_torchvision(out_dir: str, config, variables, categories: CategoryMap) -> str:
  """Writes the --format torchvision directory (module docstring); returns its path.

  Raises ValueError naming the config field when torchvision has no model for the config.
  """
  builder, kwargs, state_dict = convert.to_torchvision(to_plain(variables), config)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('--format torchvision writes a torch.save file and needs torch: '
                      'pip install -r requirements-torch.txt') from None
  weights = io.BytesIO()
  torch.save({k: torch.tensor(v) for k, v in state_dict.items()}, weights)
  fileio.publish(out_dir, {
      TORCHVISION_WEIGHTS: weights.getvalue(),
      TORCHVISION_JSON: json.dumps({'builder': builder, 'kwargs': kwargs}, indent=2).encode(),
      saved_config.CATEGORIES_FILE: categories.to_json().encode(),
  })
  return out_dir


def write_saved_model(out_dir: str, config, variables, categories: CategoryMap,
                      platforms=DEFAULT_PLATFORMS) -> str:
  """Writes the --format saved_model directory (module docstring); returns its path.

  TensorFlow writes the SavedModel into a local folder, which is then published whole, so that
  it reaches gs:// through the path layer as the other formats do.
  """
  def build(local: str):
    saved_model.write_saved_model(local, config, to_plain(variables), categories, platforms)
    fileio.write_atomic(fileio.Path(local) / saved_config.CATEGORIES_FILE, categories.to_json())
  fileio.publish_dir(build, out_dir)
  return out_dir


def _define_flags():
  return {
      'config': cli.define_config_flag('DIR/config.json'),
      'workdir': flags.DEFINE_string('workdir', '', 'Training directory (newest checkpoint).'),
      'out': flags.DEFINE_string('out', '', 'Export directory to write.'),
      'format': flags.DEFINE_enum('format', 'jax', FORMATS, 'jax: parameters, config and a '
                                  'StableHLO detector; torchvision: a state dict for '
                                  'torchvision\'s RetinaNet; saved_model: TF Serving '
                                  '(retina_jax/saved_model.py).'),
      'checkpoint': cli.define_checkpoint_flag(),
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
  try:
    sizes.check_here(config, train=False, evaluate=False, export_batch=fl['batch_size'].value)
  except sizes.SizeError as e:
    sys.exit(f'export: {e}')
  variables, step = checkpoint.restore_variables(
      fl['workdir'].value, checkpoint.parse_checkpoint_flag(fl['checkpoint'].value))
  categories = saved_config.resolve_categories(config, fl['workdir'].value)
  try:
    if fl['format'].value == 'torchvision':
      write_torchvision(fl['out'].value, config, variables, categories)
    elif fl['format'].value == 'saved_model':
      write_saved_model(fl['out'].value, config, variables, categories, fl['platforms'].value)
    else:
      write_export(fl['out'].value, config, variables, categories, fl['batch_size'].value,
                   fl['platforms'].value)
  except ValueError as e:  # A config field the format has no counterpart for, named.
    sys.exit(f'export: {e}')
  logging.info('Exported step %d of %s to %s', step, fl['workdir'].value, fl['out'].value)
  print(f'Exported step {step} of {fl["workdir"].value} to {fl["out"].value} '
        f'({fl["format"].value})')


if __name__ == '__main__':
  cli.run_with_saved_config(main, _define_flags)
