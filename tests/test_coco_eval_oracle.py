"""COCO metrics of `coco_eval.evaluate_detections` (faster-coco-eval) equal pycocotools' to 1e-6,
all 12 numbers and per category, on every kind of set the evaluation sees; its command; two
hosts sharing the matching get one host's numbers."""

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from benchmarks import coco_eval_speed
from retina_jax.data import shapes
from retina_jax.data.coco_format import CocoFormatSource
from retina_jax.evaluation import coco_eval
from tests import coco_oracle
from tests import test_eval
from tests import tiny_detector
from tests.test_data_coco_format import write_coco


def _detections_for(gt, rng, per_image=12, hit=0.6, skip=()):
  """A results list of jittered ground truth (some with another class), near misses and random
  boxes, with tied scores; no detections at all for the images in `skip`."""
  cat_ids = [c['id'] for c in gt['categories']]
  by_image = {}
  for a in gt['annotations']:
    by_image.setdefault(a['image_id'], []).append(a)
  results = []
  for im in gt['images']:
    if im['id'] in skip:
      continue
    w, h = im['width'], im['height']
    for a in by_image.get(im['id'], []):
      if rng.random() < hit:
        x, y, bw, bh = a['bbox']
        j = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
        cat = a['category_id'] if rng.random() < 0.85 else int(rng.choice(cat_ids))
        results.append({'image_id': im['id'], 'category_id': cat,
                        'bbox': [round(float(v), 3) for v in (x + j[0], y + j[1],
                                                              max(bw + j[2], 1),
                                                              max(bh + j[3], 1))],
                        'score': round(float(rng.uniform(0.2, 1)), 2)})  # Ties on purpose.
    for _ in range(per_image):
      bw, bh = np.exp(rng.uniform(np.log(2), np.log(min(w, h)), 2))
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      results.append({'image_id': im['id'], 'category_id': int(rng.choice(cat_ids)),
                      'bbox': [round(float(v), 3) for v in (x, y, bw, bh)],
                      'score': round(float(rng.uniform(0, 1)), 2)})
  return results


def _assert_same(gt, results, image_ids=None):
  ours = coco_eval.evaluate_detections(gt, results, image_ids=image_ids)
  ref = coco_oracle.pycocotools_metrics(gt, results, image_ids=image_ids)
  assert set(ours) == set(ref)
  assert coco_oracle.max_difference(ours, ref) <= 1e-6, (ours, ref)
  return ours


def _shapes_gt(num_images=40, seed=3):
  """The shapes set's ground truth as `shapes.write_split` writes it (without the images)."""
  images, annotations = [], []
  for k in range(num_images):
    pixels, objects = shapes.render_image(np.random.default_rng([seed, 1, k]))
    h, w = pixels.shape[:2]
    images.append({'id': k + 1, 'file_name': f'{k + 1:06d}.jpg', 'height': h, 'width': w})
    for (x1, y1, x2, y2), cat_id, crowd in objects:
      annotations.append({'id': len(annotations) + 1, 'image_id': k + 1, 'category_id': cat_id,
                          'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
                          'iscrowd': int(crowd)})
  categories = [{'id': i, 'name': n} for i, n in shapes.CATEGORIES]
  return {'images': images, 'annotations': annotations, 'categories': categories}


def test_shapes_set():
  gt = _shapes_gt()
  assert any(a['iscrowd'] for a in gt['annotations'])  # Crowd regions are in it.
  with_objects = {a['image_id'] for a in gt['annotations']}
  assert len(with_objects) < len(gt['images'])  # And images without objects.
  rng = np.random.default_rng(0)
  metrics = _assert_same(gt, _detections_for(gt, rng, skip={2, 5}))
  assert 0.02 < metrics['AP'] < 0.9  # Neither trivially perfect nor zero.


def test_quirky_coco_format_set(tmp_path):
  """The coco_format source's GT of a file with duplicate annotation ids, clipped, degenerate
  and outside boxes, float boxes, areas unlike the boxes, a crowd box, an annotation of an
  unknown image, an image without objects and a category without any."""
  ann = lambda k, i, bbox, cat=7, crowd=0, area=10.0: {
      'id': k, 'image_id': i, 'category_id': cat, 'bbox': bbox, 'iscrowd': crowd, 'area': area}
  anns = [ann(1, 1, [1, 2, 10, 5]), ann(1, 1, [3.5, 4.25, 20, 12.75], area=300.0),
          ann(2, 1, [5, 5, 0, 4]), ann(3, 1, [-5, 20, 10, 20], cat=2, crowd=1),
          ann(4, 2, [50, 0, 5, 5]), ann(5, 2, [30, 10, 40, 40], area=2000.0),
          ann(6, 99, [1, 1, 5, 5]), ann(7, 2, [0, 0, 12, 9], cat=2)]
  files = {f'{n}.jpg': _jpeg(k) for k, n in enumerate('abc')}
  src = CocoFormatSource(write_coco(tmp_path, files, anns), 'train')
  gt = src.coco_gt()
  gt['categories'] = gt['categories'] + [{'id': 40, 'name': 'never'}]
  assert len(gt['annotations']) == 5
  rng = np.random.default_rng(1)
  _assert_same(gt, _detections_for(gt, rng, per_image=6, hit=0.9))


def _jpeg(seed):
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  rgb = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(buf, 'JPEG')
  return buf.getvalue()


def test_crowds_empty_images_and_categories():
  """test_eval's set (every area range, a crowd box, images without objects, a category without
  any), scored from random detections, from its ground truth and with some images unseen."""
  gt = test_eval._gt_dict()  # pylint: disable=protected-access
  rng = np.random.default_rng(2)
  results = _detections_for(gt, rng, per_image=8, skip={12})
  # A detection on the crowd region of image 11 (matched to it, so neither TP nor FP).
  results.append({'image_id': 11, 'category_id': 17, 'bbox': [320, 220, 100, 100],
                  'score': 0.99})
  _assert_same(gt, results)
  _assert_same(gt, [r for r in results if r['image_id'] != 30], image_ids=[7, 11, 12, 31])
  gt_results = coco_eval.to_coco_results(
      test_eval._gt_as_detections(gt), test_eval._LABEL_TO_CAT)  # pylint: disable=protected-access
  assert _assert_same(gt, gt_results)['AP'] == pytest.approx(1.0)


def test_more_than_100_detections_per_image_and_many_categories():
  gt, dets, cat_ids = coco_eval_speed.make_problem(num_images=20, dets_per_image=130,
                                                   num_categories=85, seed=4)
  _assert_same(gt, coco_eval.to_coco_results(dets, cat_ids))


def test_to_coco_results_rounds_as_python_does():
  rng = np.random.default_rng(5)
  boxes = np.sort(rng.uniform(0, 2000, [3, 50, 4]).astype(np.float32), axis=-1)
  dets = {'image_id': np.array([1, 2, 3]), 'example_valid': np.array([True, True, False]),
          'boxes': boxes, 'scores': rng.uniform(0, 1, [3, 50]).astype(np.float32),
          'labels': rng.integers(0, 4, [3, 50]), 'valid': rng.random([3, 50]) < 0.7}
  results = coco_eval.to_coco_results(dets, [3, 17, 44, 90])
  rows, cols = np.nonzero(dets['valid'][:2])
  assert len(results) == len(rows)
  for r, i, j in zip(results, rows, cols):
    x1, y1, x2, y2 = (float(v) for v in boxes[i, j])
    assert r['bbox'] == [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
    assert r['score'] == float(dets['scores'][i, j]) and r['image_id'] == i + 1


def test_command_prints_the_table_and_writes_the_numbers(tmp_path, capsys):
  """In this process (`coco_eval.main`, what `python -m` runs) to save a jax start-up."""
  gt = test_eval._gt_dict()  # pylint: disable=protected-access
  results = _detections_for(gt, np.random.default_rng(6))
  (tmp_path / 'gt.json').write_text(json.dumps(gt))
  (tmp_path / 'dets.json').write_text(json.dumps(results))
  out = tmp_path / 'm.json'
  coco_eval.main(['--annotations', str(tmp_path / 'gt.json'), '--detections',
                  str(tmp_path / 'dets.json'), '--json', str(out)])
  metrics = json.loads(out.read_text())
  assert metrics == coco_eval.evaluate_detections(gt, results)
  assert coco_eval.format_table(metrics) in capsys.readouterr().out
  (tmp_path / 'dets.json').write_text(json.dumps({'annotations': results}))
  with pytest.raises(SystemExit, match='expected a JSON list'):
    coco_eval.main(['--annotations', str(tmp_path / 'gt.json'), '--detections',
                    str(tmp_path / 'dets.json')])


_SHARED_WORKER = textwrap.dedent('''
  import sys
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  port, pid = sys.argv[1], int(sys.argv[2])
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
  import json
  from benchmarks import coco_eval_speed
  from retina_jax.evaluation import coco_eval
  gt, dets, cat_ids = coco_eval_speed.make_problem(num_images=40, dets_per_image=30,
                                                   num_categories=9, seed=7)
  results = coco_eval.to_coco_results(dets, cat_ids)
  share = coco_eval.match_share(gt, results, share_hosts=True)
  metrics = coco_eval.merge_shares(share)
  print('RESULT', json.dumps({'mine': share.mine, 'metrics': metrics}))
''')


@pytest.mark.slow
def test_two_hosts_share_the_categories_and_get_one_host_numbers(tmp_path):
  outs = [json.loads(out.split('RESULT', 1)[1])
          for out in tiny_detector.run_workers(tmp_path, _SHARED_WORKER)]
  gt, dets, cat_ids = coco_eval_speed.make_problem(num_images=40, dets_per_image=30,
                                                   num_categories=9, seed=7)
  mine = [o['mine'] for o in outs]
  assert sorted(mine[0] + mine[1]) == sorted(cat_ids) and mine[0] and mine[1]  # Split, disjoint.
  one_host = coco_eval.evaluate_detections(gt, coco_eval.to_coco_results(dets, cat_ids))
  for o in outs:
    assert o['metrics'] == one_host  # Exactly: float64 travels bit for bit.
