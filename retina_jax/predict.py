"""Detections on one image, drawn and as JSON.

  python -m retina_jax.predict --params EXPORTED --image IN.jpg [--out OUT.png] [--json OUT.json]
      [--config ...] [--config.x=y ...] [--display_threshold 0.3]

--params is an export directory (python -m retina_jax.export) or its params.msgpack; the config
is EXPORTED/config.json unless --config is given. Any image size and mode works: grayscale,
palette, RGBA (alpha dropped), CMYK and 16-bit images become 8-bit RGB, decoded exactly as the
data pipeline decodes training images (`coco_format.decode_image`): the stored pixel layout, EXIF
orientation ignored, as COCO's annotations are. The image is resized and padded into the
config's bucket as the eval pipeline does (`preprocess.preprocess`).

Output, in the original image's pixels:
  --json: {'image': path, 'height': H, 'width': W, 'detections': [{'bbox': [x, y, w, h],
          'score', 'category_id' (the data set's id), 'category_name', 'label' (contiguous)},
          ...]}, every final detection (up to config.postprocess.max_detections), best first;
  --out:  the image with the detections scoring >= --display_threshold drawn (display only).
"""

import json
import posixpath
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from retina_jax import cli
from retina_jax import fileio
from retina_jax import inference
from retina_jax import saved_config
from retina_jax import visualize
from retina_jax.data import coco_format
from retina_jax.data import canvas as canvas_lib
from retina_jax.data import preprocess
from retina_jax.data.categories import CategoryMap


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB, as the data pipeline decodes images (module docstring)."""
  return coco_format.decode_image(path, path, None)  # A lone file has no image id.


def predict(config, variables, image: np.ndarray, categories: CategoryMap,
            detect_fn=None) -> list[dict]:
  """All final detections of one image, best first.

  Args:
    config: the full config (resize rule, canvas as in evaluation, model, post-processing).
    variables: {'params', 'batch_stats'}.
    image: uint8 [H, W, 3] RGB.
    categories: maps the model's labels to category ids and names.
    detect_fn: from `inference.make_detect_fn(config)`; built when None (reuse it across
      images of a run to compile once).
  Returns:
    [{'bbox': [x, y, w, h] original pixels, 'score': float, 'category_id': int,
      'category_name': str, 'label': int}, ...] sorted by score, descending.
  """
  detect = detect_fn if detect_fn is not None else inference.make_detect_fn(config)
  example = {'image': image, 'boxes': np.zeros((0, 4), np.float32),
             'labels': np.zeros((0,), np.int32), 'is_crowd': np.zeros((0,), bool),
             'image_id': -1}
  row = preprocess.preprocess(example, config.data,
                              canvas=canvas_lib.eval_canvas(config.data, *image.shape[:2]))
  dets = detect(variables, row['image'][None], row['image_hw'][None])
  dets = inference.to_original_coords(dets, row['scale'][None], row['orig_hw'][None])
  keep = np.flatnonzero(dets['valid'][0])
  keep = keep[np.argsort(-dets['scores'][0, keep], kind='stable')]
  out = []
  for d in keep:
    x1, y1, x2, y2 = (float(v) for v in dets['boxes'][0, d])
    label = int(dets['labels'][0, d])
    out.append({'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(dets['scores'][0, d]),
                'category_id': int(categories.ids[label]),
                'category_name': categories.names[label], 'label': label})
  return out


def draw(image: np.ndarray, detections: list[dict], categories: CategoryMap, threshold: float):
  """PIL image of `detections` (as `predict` returns) scoring >= threshold on `image`."""
  boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in
                      (d['bbox'] for d in detections)], np.float32).reshape(-1, 4)
  return visualize.draw_detections(image, boxes, [d['score'] for d in detections],
                                   [d['label'] for d in detections], categories.names,
                                   score_threshold=threshold)


def output_problem(out: str, json_path: str) -> str:
  """Why --out or --json cannot be written ('' when they can); checked before the detector runs,
  so that a typo in an output path costs no compute and no traceback."""
  for flag, path in (('--out', out), ('--json', json_path)):
    if not path or fileio.is_url(path):
      continue  # An object store (gs://) has no folders to check.
    folder = fileio.Path(fileio.absolute(path)).parent
    if not folder.is_dir():
      return f'{flag}={path}: the folder {folder} does not exist'
  ext = posixpath.splitext(out)[1].lower()
  if out and ext not in Image.registered_extensions():
    return f'--out={out}: {ext or "no extension"} is not a picture format; use .png or .jpg'
  return ''


def _define_flags():
  return {
      'config': cli.define_config_flag('the exported config.json'),
      'params': cli.define_params_flag(),
      'image': flags.DEFINE_string('image', '', 'Input image (any format PIL reads).'),
      'out': flags.DEFINE_string('out', '', 'Picture with the detections drawn (PNG/JPEG).'),
      'json': flags.DEFINE_string('json', '', 'All final detections as JSON.'),
      'display_threshold': flags.DEFINE_float('display_threshold', 0.3,
                                              'Only detections scoring at least this are '
                                              'drawn; the JSON holds all.'),
  }


def main(fl, argv):
  del argv
  params, image_path = fl['params'].value, fl['image'].value
  if not params or not image_path:
    raise app.UsageError('--params and --image are required.')
  if problem := output_problem(fl['out'].value, fl['json'].value):
    sys.exit(f'predict: {problem}')
  config = fl['config'].value
  params_dir = saved_config.export_dir(params)
  variables = saved_config.load_params(params)
  categories = saved_config.resolve_categories(config, params_dir)
  try:
    image = load_image(image_path)
  except coco_format.BadImageError as e:
    sys.exit(f'predict: {e}')  # The path and the reason; a traceback would add nothing.
  detections = predict(config, variables, image, categories)
  if fl['json'].value:
    fileio.write_atomic(fl['json'].value, json.dumps(
        {'image': image_path, 'height': image.shape[0], 'width': image.shape[1],
         'detections': detections}, indent=1))
  if fl['out'].value:
    visualize.save(draw(image, detections, categories, fl['display_threshold'].value),
                   fl['out'].value)
  shown = [d for d in detections if d['score'] >= fl['display_threshold'].value]
  print(f'{len(detections)} detections in {image_path} ({image.shape[1]}x{image.shape[0]}), '
        f'{len(shown)} with score >= {fl["display_threshold"].value}:')
  for d in shown:
    print(f'  {d["category_name"]:<20} {d["score"]:.3f}  xywh '
          + ' '.join(f'{v:.1f}' for v in d['bbox']))


if __name__ == '__main__':
  cli.run_with_saved_config(main, _define_flags)
