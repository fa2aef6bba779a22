"""COCO evaluation: detections -> COCO results list -> the 12 COCO numbers and per-class AP.

Flow in `retina_jax.evaluation.evaluator` (`retina_jax.evaluate` and the periodic evaluation of
training):
  1. every host runs the detector on its part of each eval batch and keeps fixed-size padded
     numpy arrays (`DetectionAccumulator`), boxes already in original-image pixels;
  2. `gather_and_dedupe` all-gathers them from every host and keeps each image id once, so
     that eval padding (example_valid False) and images seen by two hosts count exactly once;
  3. `to_coco_results` turns them into COCO's results format (xywh, the data set's own
     category ids, float scores, valid detections only);
  4. `evaluate_detections` runs pycocotools on them.
"""

import contextlib
import copy
import io
from typing import Any, Mapping, Sequence

import jax
import numpy as np

# The 12 numbers of `COCOeval.summarize()`, in its order.
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')

_FIELDS = ('image_id', 'example_valid', 'boxes', 'scores', 'labels', 'valid')


class DetectionAccumulator:
  """Collects one host's detections batch by batch, as fixed-size padded numpy arrays."""

  def __init__(self):
    self._parts = {k: [] for k in _FIELDS}

  def add(self, image_id, example_valid, boxes, scores, labels, valid):
    """Adds one host-local batch.

    Args:
      image_id: [B] int, the data set's image ids.
      example_valid: [B] bool, False on eval padding.
      boxes: [B, D, 4] (x1, y1, x2, y2) in original-image pixels.
      scores: [B, D] float.
      labels: [B, D] int, contiguous labels 0..K-1.
      valid: [B, D] bool, False on padded detection slots.
    """
    values = (image_id, example_valid, boxes, scores, labels, valid)
    for k, v in zip(_FIELDS, values):
      self._parts[k].append(np.asarray(v))

  def arrays(self) -> dict[str, np.ndarray]:
    """Concatenated host-local arrays: image_id [M], ..., boxes [M, D, 4], ..."""
    if not self._parts['image_id']:
      raise ValueError('No detections were added: the eval split gave no batches.')
    return {k: np.concatenate(v, axis=0) for k, v in self._parts.items()}


def dedupe_by_image_id(dets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Keeps the first example_valid row of every image id; drops padding rows.

  Args:
    dets: host or global arrays as from `DetectionAccumulator.arrays`, leading dim M.
  Returns:
    The same fields with rows [M'] in order of first appearance, M' = number of distinct ids.
  """
  ids = np.asarray(dets['image_id'])
  rows = np.flatnonzero(np.asarray(dets['example_valid']))
  _, first = np.unique(ids[rows], return_index=True)
  keep = rows[np.sort(first)]
  return {k: np.asarray(v)[keep] for k, v in dets.items()}


def gather_and_dedupe(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """All-gathers every host's detections to every host, then de-duplicates by image id.

  Hosts may hold different numbers of rows (different numbers of eval batches): each pads its
  rows to the largest count with example_valid False, because `process_allgather` needs the
  same shape everywhere.

  Args:
    local: this host's arrays as from `DetectionAccumulator.arrays`, leading dim M_host.
  Returns:
    Global arrays, each image id once, identical on every host.
  """
  local = {k: np.asarray(local[k]) for k in _FIELDS}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = local['image_id'].shape[0]
    max_n = int(np.max(multihost_utils.process_allgather(np.int32(n))))
    # Image ids may pass 2**31 and the gather runs through int32 jax arrays: as two halves.
    ids = local.pop('image_id').astype(np.int64)
    local['image_id_hi'] = (ids >> 32).astype(np.int32)
    local['image_id_lo'] = (ids & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    padded = {}
    for k, v in local.items():
      pad = [(0, max_n - n)] + [(0, 0)] * (v.ndim - 1)
      padded[k] = np.pad(v, pad)  # Zeros: example_valid False on the padding rows.
    gathered = multihost_utils.process_allgather(padded, tiled=True)
    local = {k: np.asarray(v) for k, v in gathered.items()}
    local['image_id'] = ((local.pop('image_id_hi').astype(np.int64) << 32)
                         | local.pop('image_id_lo').view(np.uint32).astype(np.int64))
  return dedupe_by_image_id(local)


def to_coco_results(dets: Mapping[str, np.ndarray],
                    label_to_category_id: Sequence[int]) -> list[dict[str, Any]]:
  """COCO results list: one dict per valid detection of an example_valid image.

  Args:
    dets: image_id [M], example_valid [M], boxes [M, D, 4] (x1, y1, x2, y2) in original-image
      pixels, scores [M, D], labels [M, D] contiguous, valid [M, D].
    label_to_category_id: entry l is the data set's category id of contiguous label l.
  Returns:
    [{'image_id': int, 'category_id': int, 'bbox': [x, y, w, h] original pixels,
      'score': float}, ...] with plain Python numbers (JSON-serializable).
  """
  cat_ids = np.asarray(label_to_category_id, np.int64)
  keep = np.asarray(dets['valid'], bool) & np.asarray(dets['example_valid'], bool)[:, None]
  rows, cols = np.nonzero(keep)
  boxes = np.asarray(dets['boxes'], np.float64)[rows, cols]
  labels = np.asarray(dets['labels'])[rows, cols]
  if labels.size and (labels.min() < 0 or labels.max() >= len(cat_ids)):
    raise ValueError(f'Detection labels span [{labels.min()}, {labels.max()}] but the category '
                     f'map has {len(cat_ids)} entries: model.num_classes and the data set '
                     'disagree.')
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
  image_ids = np.asarray(dets['image_id'])[rows]
  scores = np.asarray(dets['scores'], np.float64)[rows, cols]
  return [{'image_id': int(i), 'category_id': int(cat_ids[l]),
           'bbox': [round(float(c), 3) for c in b], 'score': float(s)}
          for i, l, b, s in zip(image_ids, labels, xywh, scores)]


def _coco_from_dict(gt: Mapping[str, Any]):
  """A pycocotools COCO object from a GT dict, filling 'area' / 'iscrowd' when absent."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  gt = copy.deepcopy(dict(gt))
  for ann in gt.get('annotations', []):
    ann.setdefault('iscrowd', 0)
    if 'area' not in ann:  # COCOeval's area ranges need it; box area is the honest fallback.
      ann['area'] = float(ann['bbox'][2] * ann['bbox'][3])
  gt.setdefault('annotations', [])
  coco = COCO()
  coco.dataset = gt
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def evaluate_detections(coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                        image_ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Runs pycocotools' bbox evaluation over the images of the GT dict.

  Args:
    coco_gt: a COCO instances dict ('images', 'annotations', 'categories'); boxes xywh in
      original pixels.
    results: a COCO results list as from `to_coco_results`.
    image_ids: the images that were evaluated (every GT image when None). An image the
      detector never saw (e.g. skipped as unreadable) must not count as all misses.
  Returns:
    {'AP': ..., ..., 'ARl': ..., 'per_class_AP': {category name: AP}} as floats in [0, 1]; a
    name that several categories share is keyed 'name (id N)'.
    A number with nothing to measure (e.g. APs without small objects, or a class without
    ground truth) is -1.0, pycocotools' own convention. Empty results give 0.0 for the 12
    numbers and per class (-1.0 for a class without ground truth) instead of pycocotools' crash.
  """
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  gt = _coco_from_dict(coco_gt)
  known = set(gt.getImgIds())
  unknown = {r['image_id'] for r in results} - known
  if unknown:
    raise ValueError(f'{len(unknown)} result image ids are not in the ground truth, '
                     f'e.g. {sorted(unknown)[:5]}: detections and annotations come from '
                     'different splits.')
  if image_ids is not None:
    evaluated = {int(i) for i in image_ids}
    if evaluated - known:
      raise ValueError(f'Evaluated image ids not in the ground truth, e.g. '
                       f'{sorted(evaluated - known)[:5]}.')
    outside = {r['image_id'] for r in results} - evaluated
    if outside:
      raise ValueError(f'Results for images outside image_ids, e.g. {sorted(outside)[:5]}.')
    known = evaluated
  cats = sorted(gt.dataset.get('categories', []), key=lambda c: c['id'])
  if not results:
    return _empty_metrics(gt, cats)
  with contextlib.redirect_stdout(io.StringIO()):
    dt = gt.loadRes(copy.deepcopy(list(results)))  # loadRes writes 'area' and 'id' into them.
    coco_eval = COCOeval(gt, dt, iouType='bbox')
    coco_eval.params.imgIds = sorted(known)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  metrics = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
  # precision: [T iou thresholds, R recall points, K categories, A areas, M max dets];
  # area 'all' is index 0 and maxDets 100 the last, as for the headline AP.
  precision = coco_eval.eval['precision'][:, :, :, 0, -1]
  cat_index = {c: k for k, c in enumerate(coco_eval.params.catIds)}
  per_class = {}
  for key, cat in zip(_class_keys(cats), cats):
    p = precision[:, :, cat_index[cat['id']]]
    p = p[p > -1]
    per_class[key] = float(p.mean()) if p.size else -1.0
  metrics['per_class_AP'] = per_class
  return metrics


def _class_keys(cats: Sequence[Mapping[str, Any]]) -> list[str]:
  """per_class_AP keys: the category names, with ' (id N)' added to a name that several
  categories share, so that no class's AP overwrites another's."""
  names = [str(c.get('name', c['id'])) for c in cats]
  return [f'{n} (id {c["id"]})' if names.count(n) > 1 else n for n, c in zip(names, cats)]


def _empty_metrics(gt, cats) -> dict[str, Any]:
  """Zeros (no detections found anything), -1 for classes without ground truth."""
  metrics = {name: 0.0 for name in METRIC_NAMES}
  with_gt = {a['category_id'] for a in gt.dataset['annotations'] if not a.get('iscrowd', 0)}
  metrics['per_class_AP'] = {key: 0.0 if c['id'] in with_gt else -1.0
                             for key, c in zip(_class_keys(cats), cats)}
  return metrics


def format_table(metrics: Mapping[str, Any], per_class: bool = True) -> str:
  """A plain-text table of the 12 COCO numbers (in percent) and, optionally, per-class AP;
  'n/a' where there was nothing to measure (-1)."""
  pct = lambda v: f'{100 * v:6.2f}' if v >= 0 else f'{"n/a":>6}'
  lines = [f'{"metric":<8} {"value":>6}']
  lines += [f'{name:<8} {pct(metrics[name])}' for name in METRIC_NAMES]
  if per_class and metrics.get('per_class_AP'):
    width = max([len('class')] + [len(n) for n in metrics['per_class_AP']])
    lines.append('')
    lines.append(f'{"class":<{width}}  {"AP":>6}')
    lines += [f'{name:<{width}}  {pct(ap)}' for name, ap in metrics['per_class_AP'].items()]
  return '\n'.join(lines)
