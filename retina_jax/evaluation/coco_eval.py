"""COCO evaluation: detections -> COCO results list -> the 12 COCO numbers and per-class AP.

Flow in `retina_jax.evaluation.evaluator` (`retina_jax.evaluate` and the periodic evaluation of
training):
  1. every host runs the detector on its part of each eval batch and keeps fixed-size padded
     numpy arrays (`DetectionAccumulator`), boxes already in original-image pixels;
  2. `gather_and_dedupe` all-gathers them from every host and keeps each image id once, so
     that eval padding (example_valid False) and images seen by two hosts count exactly once;
  3. `to_coco_results` turns them into COCO's results format (xywh, the data set's own
     category ids, float scores, valid detections only);
  4. `evaluate_detections` scores them as pycocotools does, with faster-coco-eval's C++
     matching and accumulation (a fraction of pycocotools' time, benchmarks/RESULTS.md; the
     tests keep pycocotools as the oracle), optionally shared among the hosts by category
     (`match_share` on each, `merge_shares` puts the parts together).

  python -m retina_jax.evaluation.coco_eval --annotations GT.json --detections DETS.json
      [--json OUT]
scores any COCO results file (torchvision's output included) and prints the table of
`retina_jax.evaluate`.
"""

import argparse
import dataclasses
import json
import time
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
    [{'image_id': int, 'category_id': int, 'bbox': [x, y, w, h] original pixels rounded to
      3 decimals, 'score': float}, ...] with plain Python numbers (JSON-serializable).
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
  # np.round, not Python's round per number (10x faster on 500k detections): both give the
  # double nearest to the 3-decimal value whenever 1000 x fits exactly in a double, which holds
  # for the detector's float32 boxes.
  image_ids = np.asarray(dets['image_id'])[rows].tolist()
  scores = np.asarray(dets['scores'], np.float64)[rows, cols].tolist()
  return [{'image_id': i, 'category_id': c, 'bbox': b, 'score': s}
          for i, c, b, s in zip(image_ids, cat_ids[labels].tolist(),
                                np.round(xywh, 3).tolist(), scores)]


def _coco_from_dict(gt: Mapping[str, Any]):
  """A faster-coco-eval COCO object of a GT dict, filling 'area' / 'iscrowd' when absent; the
  annotation dicts are copies (evaluation writes into them), the caller's stay as they were."""
  from faster_coco_eval import COCO  # pylint: disable=g-import-not-at-top
  anns = []
  for ann in gt.get('annotations', []):
    ann = dict(ann)
    ann.setdefault('iscrowd', 0)
    if 'area' not in ann:  # COCOeval's area ranges need it; box area is the honest fallback.
      ann['area'] = float(ann['bbox'][2] * ann['bbox'][3])
    anns.append(ann)
  coco = COCO(print_function=_quiet)
  coco.dataset = {**gt, 'images': [dict(im) for im in gt.get('images', [])],
                  'annotations': anns}
  coco.createIndex()
  return coco


def _results_coco(gt, results: Sequence[Mapping[str, Any]]):
  """The detections as a COCO object, as pycocotools' `loadRes` makes it for boxes (area w * h,
  ids 1..N, iscrowd 0), without its per-detection polygon and copies of the whole list."""
  from faster_coco_eval import COCO  # pylint: disable=g-import-not-at-top
  anns = [{'image_id': r['image_id'], 'category_id': r['category_id'], 'bbox': r['bbox'],
           'score': r['score'], 'area': r['bbox'][2] * r['bbox'][3], 'id': k, 'iscrowd': 0}
          for k, r in enumerate(results, 1)]
  dt = COCO(print_function=_quiet)
  dt.dataset = {'images': gt.dataset['images'], 'categories': gt.dataset['categories'],
                'annotations': anns}
  dt.createIndex()
  return dt


def _quiet(*args, **kwargs):
  del args, kwargs


def _precision_recall(gt, dt, image_ids: Sequence[int], cat_ids: Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """COCOeval's accumulated arrays over `cat_ids`: precision [T, R, K, A, M] and recall
  [T, K, A, M] (10 IoU thresholds, 101 recall points, categories in `cat_ids` order, areas all,
  small, medium, large, maxDets 1, 10, 100); -1 where there is nothing to measure."""
  from faster_coco_eval.core.faster_eval_api import COCOeval_faster  # pylint: disable=g-import-not-at-top
  if not cat_ids:
    return np.zeros([10, 101, 0, 4, 3]), np.zeros([10, 0, 4, 3])
  e = COCOeval_faster(gt, dt, iouType='bbox', print_function=_quiet)
  e.params.imgIds = list(image_ids)
  e.params.catIds = list(cat_ids)
  e.evaluate()
  e.accumulate()
  # evaluate() sorts catIds; put the columns back in the caller's order.
  order = [sorted(cat_ids).index(c) for c in cat_ids]
  return (np.asarray(e.eval['precision'], np.float64)[:, :, order],
          np.asarray(e.eval['recall'], np.float64)[:, order])


# (ap, IoU threshold index or None, area index, maxDets index) of each of the 12 numbers, as
# `COCOeval.summarize()` computes them.
_SUMMARY = ((1, None, 0, 2), (1, 0, 0, 2), (1, 5, 0, 2), (1, None, 1, 2), (1, None, 2, 2),
            (1, None, 3, 2), (0, None, 0, 0), (0, None, 0, 1), (0, None, 0, 2), (0, None, 1, 2),
            (0, None, 2, 2), (0, None, 3, 2))


def summarize(precision: np.ndarray, recall: np.ndarray) -> list[float]:
  """The 12 numbers of `COCOeval.summarize()` from precision [T, R, K, A, M] and recall
  [T, K, A, M]: each the mean of the entries > -1 of its slice, -1 when there are none."""
  stats = []
  for ap, t, a, m in _SUMMARY:
    s = precision[..., a, m] if ap else recall[..., a, m]
    if t is not None:
      s = s[t]
    s = s[s > -1]
    stats.append(float(np.mean(s)) if s.size else -1.0)
  return stats


def _shared_categories(cat_ids: list[int], gt) -> list[int]:
  """This host's share of the categories when several hosts evaluate: about equal numbers of
  ground-truth boxes each (the matching work grows with them), assigned greedily, largest first."""
  count = jax.process_count()
  if count == 1:
    return cat_ids
  sizes = {c: len(gt.catToImgs.get(c, [])) for c in cat_ids}
  load, mine = [0] * count, []
  for c in sorted(cat_ids, key=lambda c: (-sizes[c], c)):
    host = int(np.argmin(load))
    load[host] += sizes[c] + 1
    if host == jax.process_index():
      mine.append(c)
  return mine


def _merge_from_hosts(mine: list[int], precision: np.ndarray, recall: np.ndarray,
                      cat_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Every host's precision and recall columns put together in `cat_ids` order, identical on
  every host. The arrays travel as int32 pairs: a float64 gathered through jax (x64 off) would
  arrive rounded to float32."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  width = -(-len(cat_ids) // jax.process_count())
  def padded(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - x.shape[axis])
    return np.ascontiguousarray(np.pad(x, pad)).view(np.int32)
  ids = np.full([width], -1, np.int64)
  ids[:len(mine)] = mine
  gathered = multihost_utils.process_allgather(
      {'ids': ids.view(np.int32), 'precision': padded(precision, 2),
       'recall': padded(recall, 1)})
  all_ids = np.asarray(gathered['ids']).view(np.int64).reshape(-1)
  all_p = np.concatenate(list(np.asarray(gathered['precision']).view(np.float64)), axis=2)
  all_r = np.concatenate(list(np.asarray(gathered['recall']).view(np.float64)), axis=1)
  where = {int(c): k for k, c in enumerate(all_ids) if c >= 0}
  order = [where[c] for c in cat_ids]
  return all_p[:, :, order], all_r[:, order]


@dataclasses.dataclass
class HostShare:
  """One host's part of the COCO metric, before the hosts' parts are put together.

  precision [T, R, K', A, M] and recall [T, K', A, M] are COCOeval's accumulated arrays over
  this host's categories `mine` (K' of them, in that order): 10 IoU thresholds, 101 recall
  points, areas all/small/medium/large, maxDets 1/10/100, -1 where nothing is measured.
  `empty` holds the whole metrics when there were no detections at all.
  """
  cat_ids: list[int]
  keys: list[str]
  mine: list[int]
  precision: np.ndarray
  recall: np.ndarray
  shared: bool
  empty: dict[str, Any] | None = None


def match_share(coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                image_ids: Sequence[int] | None = None, *, share_hosts: bool = False,
                times: dict[str, float] | None = None) -> HostShare:
  """The matching and accumulation of `evaluate_detections` for this host's categories (all of
  them unless `share_hosts` on several hosts); runs no collective, so it may run in a thread
  while the devices train. Arguments as `evaluate_detections`'."""
  times = {} if times is None else times
  clock = time.perf_counter()
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
  cat_ids = [c['id'] for c in cats]
  shared = share_hosts and jax.process_count() > 1
  if not results:
    return HostShare(cat_ids, _class_keys(cats), [], *_precision_recall(None, None, [], []),
                     shared, empty=_empty_metrics(gt, cats))
  dt = _results_coco(gt, results)
  times['index'] = time.perf_counter() - clock
  clock = time.perf_counter()
  mine = _shared_categories(cat_ids, gt) if shared else cat_ids
  precision, recall = _precision_recall(gt, dt, sorted(known), mine)
  times['evaluate'] = time.perf_counter() - clock
  return HostShare(cat_ids, _class_keys(cats), mine, precision, recall, shared)


def merge_shares(share: HostShare) -> dict[str, Any]:
  """The metrics of `evaluate_detections` from every host's `HostShare`: a collective when the
  work was shared, which every host calls at the same point."""
  if share.empty is not None:
    return share.empty
  precision, recall = share.precision, share.recall
  if share.shared:
    precision, recall = _merge_from_hosts(share.mine, precision, recall, share.cat_ids)
  metrics = dict(zip(METRIC_NAMES, summarize(precision, recall)))
  # Area 'all' is index 0 and maxDets 100 the last, as for the headline AP.
  per_class = {}
  for k, key in enumerate(share.keys):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    per_class[key] = float(p.mean()) if p.size else -1.0
  metrics['per_class_AP'] = per_class
  return metrics


def evaluate_detections(coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                        image_ids: Sequence[int] | None = None, *, share_hosts: bool = False,
                        times: dict[str, float] | None = None) -> dict[str, Any]:
  """COCO's bbox evaluation over the images of the GT dict: pycocotools' numbers, computed with
  faster-coco-eval's C++ matching and accumulation (tests check them against pycocotools).

  Args:
    coco_gt: a COCO instances dict ('images', 'annotations', 'categories'); boxes xywh in
      original pixels.
    results: a COCO results list as from `to_coco_results`.
    image_ids: the images that were evaluated (every GT image when None). An image the
      detector never saw (e.g. skipped as unreadable) must not count as all misses.
    share_hosts: every host calls with the same arguments; each matches its share of the
      categories (about equal numbers of boxes) and the shares are gathered: the same numbers
      as one host alone.
    times: when given, receives the seconds of each phase by name.
  Returns:
    {'AP': ..., ..., 'ARl': ..., 'per_class_AP': {category name: AP}} as floats in [0, 1]; a
    name that several categories share is keyed 'name (id N)'.
    A number with nothing to measure (e.g. APs without small objects, or a class without
    ground truth) is -1.0, pycocotools' own convention. Empty results give 0.0 for the 12
    numbers and per class (-1.0 for a class without ground truth) instead of pycocotools' crash.
  """
  share = match_share(coco_gt, results, image_ids, share_hosts=share_hosts, times=times)
  clock = time.perf_counter()
  metrics = merge_shares(share)
  if times is not None:
    times['merge'] = time.perf_counter() - clock
  return metrics


def _class_keys(cats: Sequence[Mapping[str, Any]]) -> list[str]:
  """per_class_AP keys: the category names, with ' (id N)' added to a name that several
  categories share, so that no class's AP overwrites another's."""
  names = [str(c.get('name', c['id'])) for c in cats]
  return [f'{n} (id {c["id"]})' if names.count(n) > 1 else n for n, c in zip(names, cats)]


def _empty_metrics(gt, cats) -> dict[str, Any]:
  """Zeros (no detections found anything), -1 for classes without ground truth."""
  metrics = {name: 0.0 for name in METRIC_NAMES}
  with_gt = {a['category_id'] for a in gt.dataset['annotations'] if not a['iscrowd']}
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


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(
      prog='python -m retina_jax.evaluation.coco_eval',
      description='COCO bbox metrics of a detections file (COCO results format).')
  parser.add_argument('--annotations', required=True, help='COCO instances JSON (ground truth).')
  parser.add_argument('--detections', required=True,
                      help='COCO results JSON: [{image_id, category_id, bbox xywh, score}].')
  parser.add_argument('--json', default='', help='Also write the metrics here.')
  args = parser.parse_args(argv)
  from retina_jax import fileio  # pylint: disable=g-import-not-at-top
  gt = json.loads(fileio.Path(args.annotations).read_text())
  results = json.loads(fileio.Path(args.detections).read_text())
  if not isinstance(results, list):
    raise SystemExit(f'{args.detections}: expected a JSON list of detections (COCO results '
                     f'format), got a {type(results).__name__}.')
  metrics = evaluate_detections(gt, results)
  print(f'COCO bbox evaluation of {args.detections} against {args.annotations} '
        f'({len(results)} detections, {len(gt.get("images", []))} images)')
  print(format_table(metrics))
  if args.json:
    fileio.write_atomic(fileio.Path(args.json), json.dumps(metrics, indent=2))
    print(f'Wrote {args.json}')


if __name__ == '__main__':
  main()
