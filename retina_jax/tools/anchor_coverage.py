"""How well an anchor configuration covers a data set's ground-truth boxes.

  python -m retina_jax.tools.anchor_coverage --config experiments/<file>.py [--config.x=y ...]
      [--split train] [--max_images 0] [--json OUT.json]

For every non-crowd ground-truth box: resize it into the bucket exactly as the input pipeline
resizes its image (`resize.resize_geometry` of config.data.resize, clipped to the resized
image), and take its best IoU over all anchors of the padded bucket (config.anchors, levels
P{min_level}..P{max_level}). The share of boxes whose best IoU reaches 0.5 (they get a foreground anchor from the IoU rule) and
0.4 (at least not all background), by COCO object size. The size classes use COCO's definition,
the annotation's area in ORIGINAL-image pixels (small < 32^2 <= medium < 96^2 <= large), so the
rows line up with APs / APm / APl; the IoU is computed after resizing into the bucket, where the
anchors live. Boxes below 0.5 still get their best anchor when matcher.allow_low_quality is on.
"""

import functools
import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from retina_jax import anchors as anchors_lib
from retina_jax import box_ops
from retina_jax import cli
from retina_jax import fileio
from retina_jax.data import pipeline
from retina_jax.data import resize

SIZES = (('small', 0.0, 32.0 ** 2), ('medium', 32.0 ** 2, 96.0 ** 2),
         ('large', 96.0 ** 2, float('inf')))
THRESHOLDS = (0.5, 0.4)
_CHUNK = 32  # Boxes per IoU call: [32, N] floats stay small even for N ~ 400k anchors.


def resized_boxes(coco_gt: dict, data_cfg) -> tuple[np.ndarray, np.ndarray]:
  """Non-crowd GT boxes of a COCO dict, resized as the pipeline resizes their images.

  Args:
    coco_gt: COCO instances dict; bbox xywh in original pixels.
    data_cfg: config.data (min_size, max_size, image_size).
  Returns:
    boxes [M, 4] float32 (x1, y1, x2, y2) resized-image pixels; areas [M] float64 in original
    pixels (the annotation's 'area', the box area when absent).
  """
  hw = {im['id']: (im['height'], im['width']) for im in coco_gt['images']}
  boxes, areas = [], []
  for ann in coco_gt['annotations']:
    if ann.get('iscrowd', 0) or ann['image_id'] not in hw:
      continue
    h, w = hw[ann['image_id']]
    (nh, nw), (sy, sx) = resize.resize_geometry(h, w, data_cfg.min_size, data_cfg.max_size,
                                                data_cfg.image_size, data_cfg.resize)
    x, y, bw, bh = ann['bbox']
    box = np.asarray([x, y, x + bw, y + bh], np.float32) * np.asarray([sx, sy, sx, sy],
                                                                      np.float32)
    boxes.append(np.clip(box, 0, np.asarray([nw, nh, nw, nh], np.float32)))
    areas.append(float(ann.get('area') or bw * bh))
  return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(areas, np.float64))


@jax.jit
def _best_iou_chunk(boxes, anchors):
  return jnp.max(box_ops.pairwise_iou(boxes, anchors), axis=1)


def best_anchor_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
  """boxes [M, 4], anchors [N, 4] (x1, y1, x2, y2) pixels -> [M] best IoU of each box."""
  m = boxes.shape[0]
  padded = np.zeros((-(-m // _CHUNK) * _CHUNK, 4), np.float32)  # One compiled shape.
  padded[:m] = boxes
  anchors = jnp.asarray(anchors)
  best = [np.asarray(_best_iou_chunk(padded[i:i + _CHUNK], anchors))
          for i in range(0, len(padded), _CHUNK)]
  return np.concatenate(best)[:m] if best else np.zeros((0,), np.float32)


def coverage(config, coco_gt: dict) -> dict:
  """{'all' | 'small' | 'medium' | 'large': {'count', 'iou>=0.5', 'iou>=0.4',
  'mean_best_iou'}} for the non-crowd boxes of `coco_gt` under config's anchors and bucket;
  the shares are None for a size without boxes."""
  size = config.data.image_size
  anchors = anchors_lib.generate_anchors(config.anchors, config.model.min_level,
                                         config.model.max_level, (size, size))
  boxes, areas = resized_boxes(coco_gt, config.data)
  best = best_anchor_iou(boxes, anchors)
  rows = {'all': np.ones(len(best), bool)}
  rows.update({name: (areas >= lo) & (areas < hi) for name, lo, hi in SIZES})
  out = {}
  for name, sel in rows.items():
    n = int(sel.sum())
    row = {'count': n}
    for t in THRESHOLDS:
      row[f'iou>={t}'] = float(np.mean(best[sel] >= t)) if n else None
    row['mean_best_iou'] = float(np.mean(best[sel])) if n else None
    out[name] = row
  return out


def format_table(result: dict) -> str:
  lines = [f'{"size":<8} {"boxes":>8} ' + ' '.join(f'{"IoU>=" + str(t):>9}' for t in THRESHOLDS)
           + f' {"mean best":>10}']
  for name, row in result.items():
    if not row['count']:
      lines.append(f'{name:<8} {0:>8} ' + ' '.join(f'{"n/a":>9}' for _ in THRESHOLDS)
                   + f' {"n/a":>10}')
      continue
    shares = ' '.join(f'{100 * row[f"iou>={t}"]:8.1f}%' for t in THRESHOLDS)
    lines.append(f'{name:<8} {row["count"]:>8} {shares} {row["mean_best_iou"]:10.3f}')
  return '\n'.join(lines)


def _define_flags():
  return {
      'config': config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                                lock_config=True),
      'split': flags.DEFINE_string('split', '', 'Split; default config.data.train_split.'),
      'max_images': flags.DEFINE_integer('max_images', 0, 'First N images only (0: all).'),
      'json': flags.DEFINE_string('json', '', 'Also write the result here as JSON.'),
  }


def main(fl, argv):
  del argv
  config = fl['config'].value
  if config is None:
    raise app.UsageError('--config is required.')
  split = fl['split'].value or config.data.train_split
  source = pipeline.create_source(config.data, split)
  result = coverage(config, source.coco_gt(fl['max_images'].value))
  print(f'Anchor coverage of {config.data.name}:{split} (IoU in the {config.data.image_size} px '
        'bucket, sizes by original-pixel area):')
  print(format_table(result))
  if fl['json'].value:
    fileio.write_atomic(fl['json'].value, json.dumps(
        {'split': split, 'image_size': config.data.image_size,
         'anchors': config.anchors.to_dict(), 'coverage': result}, indent=2))


def run():
  cli.skip_absent_tpu()
  fl = _define_flags()
  app.run(functools.partial(main, fl), argv=sys.argv, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
