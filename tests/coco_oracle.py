"""pycocotools, the reference for COCO metrics: the dict of `coco_eval.evaluate_detections`
computed with pycocotools' own COCO, loadRes and COCOeval, phase by phase."""

import contextlib
import copy
import io
import time

from retina_jax.evaluation import coco_eval


def pycocotools_metrics(gt_dict, results, image_ids=None, times=None):
  """The metrics dict of `coco_eval.evaluate_detections` computed with pycocotools (the
  oracle), each phase's seconds added to `times` when given."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  times = {} if times is None else times
  gt_dict = copy.deepcopy(gt_dict)
  for ann in gt_dict['annotations']:
    ann.setdefault('iscrowd', 0)
    ann.setdefault('area', float(ann['bbox'][2] * ann['bbox'][3]))
  cats = sorted(gt_dict['categories'], key=lambda c: c['id'])
  with contextlib.redirect_stdout(io.StringIO()):
    t = time.perf_counter()
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()
    times['index'] = time.perf_counter() - t
    if not results:
      return None
    t = time.perf_counter()
    dt = gt.loadRes(copy.deepcopy(list(results)))
    times['loadRes'] = time.perf_counter() - t
    e = COCOeval(gt, dt, iouType='bbox')
    e.params.imgIds = sorted(gt.getImgIds() if image_ids is None else
                             {int(i) for i in image_ids})
    for phase in ('evaluate', 'accumulate', 'summarize'):
      t = time.perf_counter()
      getattr(e, phase)()
      times[phase] = time.perf_counter() - t
  metrics = {name: float(v) for name, v in zip(coco_eval.METRIC_NAMES, e.stats)}
  precision = e.eval['precision'][:, :, :, 0, -1]
  per_class = {}
  for key, cat in zip(coco_eval._class_keys(cats), cats):  # pylint: disable=protected-access
    p = precision[:, :, e.params.catIds.index(cat['id'])]
    p = p[p > -1]
    per_class[key] = float(p.mean()) if p.size else -1.0
  metrics['per_class_AP'] = per_class
  return metrics


def max_difference(a, b) -> float:
  """Largest absolute difference over the 12 numbers and per-class AP (inf if keys differ)."""
  if set(a['per_class_AP']) != set(b['per_class_AP']):
    return float('inf')
  diffs = [abs(a[n] - b[n]) for n in coco_eval.METRIC_NAMES]
  diffs += [abs(a['per_class_AP'][k] - b['per_class_AP'][k]) for k in a['per_class_AP']]
  return max(diffs)
