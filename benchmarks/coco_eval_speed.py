"""COCO bbox metrics of a COCO-val-sized problem: pycocotools against ours, each phase timed.

  python -m benchmarks.coco_eval_speed [--images 5000 --dets 100 --categories 80] [--json]
      [--skip-pycocotools]

The problem is generated, not downloaded: `--images` images of 640x480 or 480x640 pixels with
~7.4 ground-truth boxes each (COCO val2017: 36,781 non-crowd boxes over 5,000 images), ~1% of
them crowd regions and ~1% of the images without any object, box sizes log-uniform from 4 px to
the image (all three COCO area ranges), `--categories` categories with COCO's non-contiguous
ids. The detector's output is `--dets` detections per image in the padded arrays that
`retina_jax.evaluation.evaluator` gathers: jittered copies of the ground truth (some with a
wrong class) and random boxes, scores uniform. Both sides start from those arrays and end with
the same 12 numbers and per-class AP (checked here); pycocotools' side goes through the COCO
results list, as `retina_jax.evaluate` did before faster-coco-eval.
"""

import argparse
import json
import platform
import time

import numpy as np

from retina_jax.evaluation import coco_eval
from tests import coco_oracle

# COCO's 80 category ids in its 1..90 space.
COCO_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
            25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49,
            50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74,
            75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


def make_problem(num_images: int = 5000, dets_per_image: int = 100, num_categories: int = 80,
                 seed: int = 0):
  """-> (gt dict, detection arrays as `coco_eval.DetectionAccumulator.arrays`, label map).

  Boxes: GT xywh, detections (x1, y1, x2, y2), original pixels. Categories beyond 80 get ids
  past 90.
  """
  rng = np.random.default_rng(seed)
  cat_ids = list(COCO_IDS[:num_categories]) + list(range(91, 91 + num_categories - 80))
  categories = [{'id': c, 'name': f'class{c}'} for c in cat_ids]
  images, annotations = [], []
  n = num_images
  det_boxes = np.zeros([n, dets_per_image, 4], np.float32)
  det_scores = rng.uniform(0.05, 1.0, [n, dets_per_image]).astype(np.float32)
  det_labels = rng.integers(0, num_categories, [n, dets_per_image]).astype(np.int32)
  det_valid = np.ones([n, dets_per_image], bool)
  # Class frequencies as skewed as COCO's (person is ~30% of the boxes).
  freq = 1.0 / np.arange(1, num_categories + 1) ** 0.8
  freq /= freq.sum()
  for k in range(n):
    w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
    image_id = 100000 + 7 * k  # Sparse ids, as COCO's.
    images.append({'id': image_id, 'width': w, 'height': h, 'file_name': f'{image_id}.jpg'})
    num = 0 if rng.random() < 0.01 else int(rng.integers(1, 14))
    sides = np.exp(rng.uniform(np.log(4), np.log(min(w, h)), [num, 2]))
    x1 = rng.uniform(0, 1, num) * (w - sides[:, 0])
    y1 = rng.uniform(0, 1, num) * (h - sides[:, 1])
    labels = rng.choice(num_categories, num, p=freq)
    crowd = rng.random(num) < 0.01
    for j in range(num):
      bbox = [round(float(x1[j]), 2), round(float(y1[j]), 2), round(float(sides[j, 0]), 2),
              round(float(sides[j, 1]), 2)]
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': cat_ids[labels[j]], 'bbox': bbox,
                          'area': bbox[2] * bbox[3] * 0.8, 'iscrowd': int(crowd[j])})
    # Detections: up to 3 jittered copies of each GT box (10% with a wrong class), then random.
    copies = min(dets_per_image, 3 * num)
    src = np.repeat(np.arange(num), 3)[:copies]
    jitter = rng.normal(0, 0.1, [copies, 4]) * np.repeat(sides[src], 2, axis=1)
    gx = np.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], 1)[src] if num else np.zeros(
        [0, 4])
    det_boxes[k, :copies] = gx + jitter
    wrong = rng.random(copies) < 0.1
    det_labels[k, :copies] = np.where(wrong, det_labels[k, :copies], labels[src])
    rest = dets_per_image - copies
    c = rng.uniform(0, 1, [rest, 2]) * [w, h]
    s = np.exp(rng.uniform(np.log(4), np.log(min(w, h)), [rest, 2]))
    det_boxes[k, copies:] = np.concatenate([c - s / 2, c + s / 2], 1)
    det_boxes[k] = np.clip(det_boxes[k], 0, [w, h, w, h])
  # A few images the detector found nothing in (valid False everywhere).
  det_valid[rng.random(n) < 0.005] = False
  dets = {'image_id': np.array([im['id'] for im in images], np.int64),
          'example_valid': np.ones([n], bool), 'boxes': det_boxes, 'scores': det_scores,
          'labels': det_labels, 'valid': det_valid}
  gt = {'images': images, 'annotations': annotations, 'categories': categories}
  return gt, dets, cat_ids


def _timed(name, score, dets, cat_ids):
  """score(results, times) from the detector's arrays, each phase timed into `times` ->
  (metrics, total seconds, times); the results list is built by each side's own run."""
  times = {}
  t0 = time.perf_counter()
  results = coco_eval.to_coco_results(dets, cat_ids)
  times['to_coco_results'] = time.perf_counter() - t0
  metrics = score(results, times)
  total = time.perf_counter() - t0
  print(f'{name}: {total:.2f} s  ' + '  '.join(f'{k} {v:.2f}' for k, v in times.items()),
        flush=True)
  return metrics, total, times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--images', type=int, default=5000)
  parser.add_argument('--dets', type=int, default=100)
  parser.add_argument('--categories', type=int, default=80)
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--skip-pycocotools', action='store_true')
  args = parser.parse_args()
  t = time.perf_counter()
  gt, dets, cat_ids = make_problem(args.images, args.dets, args.categories)
  print(f'generated {len(gt["images"])} images, {len(gt["annotations"])} GT boxes, '
        f'{int(dets["valid"].sum())} detections in {time.perf_counter() - t:.1f} s', flush=True)

  ours, ours_total, ours_times = _timed(
      'ours', lambda results, times: coco_eval.evaluate_detections(gt, results, times=times),
      dets, cat_ids)
  row = {'date': time.strftime('%Y-%m-%d'), 'machine': f'{platform.machine()}, '
         f'{_cpu_count()} cores', 'images': args.images, 'dets_per_image': args.dets,
         'gt_boxes': len(gt['annotations']), 'ours_s': ours_total, 'ours_phases': ours_times,
         'AP': ours['AP']}
  if not args.skip_pycocotools:
    ref, ref_total, ref_times = _timed(
        'pycocotools',
        lambda results, times: coco_oracle.pycocotools_metrics(gt, results, times=times),
        dets, cat_ids)
    row.update(pycocotools_s=ref_total, pycocotools_phases=ref_times,
               ratio=ours_total / ref_total, max_abs_difference=coco_oracle.max_difference(ours, ref))
    print(f'ours / pycocotools = {row["ratio"]:.3f}; largest difference of the 12 numbers and '
          f'per-class AP: {row["max_abs_difference"]:.2e}')
    if row['max_abs_difference'] > 1e-6:
      raise SystemExit('ours and pycocotools disagree')
  if args.json:
    print(json.dumps(row))


def _cpu_count() -> int:
  import os  # pylint: disable=g-import-not-at-top
  return len(os.sched_getaffinity(0))


if __name__ == '__main__':
  main()
