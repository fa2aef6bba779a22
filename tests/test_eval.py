"""COCO evaluation: ground truth fed back scores AP 1, empty results, de-duplication, gather."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retina_jax.evaluation import coco_eval
from tests import tiny_detector

# Non-contiguous, unordered category ids, as COCO's (1..90 with gaps).
_CATEGORIES = [{'id': 90, 'name': 'toothbrush'}, {'id': 3, 'name': 'car'},
               {'id': 17, 'name': 'cat'}, {'id': 44, 'name': 'bottle'}]
_LABEL_TO_CAT = [3, 17, 44, 90]  # Contiguous label l <-> category id, sorted by id.


def _gt_dict():
  """Five images: objects of every COCO size, a crowd box, two images without objects."""
  images = [{'id': i, 'width': 640, 'height': 480, 'file_name': f'{i}.jpg'}
            for i in (7, 11, 12, 30, 31)]
  boxes = [  # image id, category id, xywh, iscrowd
      (7, 3, [10, 20, 20, 20], 0),      # small (400 px^2)
      (7, 17, [100, 100, 60, 60], 0),   # medium
      (7, 3, [200, 50, 300, 250], 0),   # large
      (11, 90, [5.5, 6.25, 40, 70], 0),
      (11, 17, [300, 200, 200, 200], 1),  # crowd
      (12, 17, [50, 60, 120, 80], 0),
      (12, 17, [60, 70, 120, 80], 0),   # overlaps the previous one (IoU ~0.7)
  ]  # 30, 31: no objects. 44 'bottle' has no ground truth at all.
  anns = [{'id': k + 1, 'image_id': i, 'category_id': c, 'bbox': b, 'area': b[2] * b[3],
           'iscrowd': crowd} for k, (i, c, b, crowd) in enumerate(boxes)]
  return {'images': images, 'annotations': anns, 'categories': _CATEGORIES}


def _gt_as_detections(gt, max_dets=4):
  """Padded detector-style arrays holding every non-crowd GT box with score 1."""
  ids = [im['id'] for im in gt['images']]
  n = len(ids)
  dets = {'image_id': np.array(ids, np.int32), 'example_valid': np.ones([n], bool),
          'boxes': np.zeros([n, max_dets, 4], np.float32), 'scores': np.zeros([n, max_dets]),
          'labels': np.zeros([n, max_dets], np.int32), 'valid': np.zeros([n, max_dets], bool)}
  fill = [0] * n
  for a in gt['annotations']:
    if a['iscrowd']:
      continue
    r = ids.index(a['image_id'])
    x, y, w, h = a['bbox']
    dets['boxes'][r, fill[r]] = [x, y, x + w, y + h]
    dets['scores'][r, fill[r]] = 1.0
    dets['labels'][r, fill[r]] = _LABEL_TO_CAT.index(a['category_id'])
    dets['valid'][r, fill[r]] = True
    fill[r] += 1
  return dets


def test_ground_truth_as_detections_scores_one():
  gt = _gt_dict()
  dets = _gt_as_detections(gt)
  # Garbage in the padded slots and an eval-padding row must not leak into the results.
  dets['boxes'][:, -1] = [1, 1, 50, 50]
  dets['scores'][:, -1] = 0.9
  for k in dets:
    dets[k] = np.concatenate([dets[k], dets[k][:1]])
  dets['example_valid'][-1] = False
  dets['valid'][-1] = True
  dets = coco_eval.dedupe_by_image_id(dets)
  results = coco_eval.to_coco_results(dets, _LABEL_TO_CAT)
  assert len(results) == 6  # The six non-crowd boxes, nothing else.
  assert {r['category_id'] for r in results} == {3, 17, 90}
  r11 = [r for r in results if r['image_id'] == 11]
  assert r11 == [{'image_id': 11, 'category_id': 90, 'bbox': [5.5, 6.25, 40.0, 70.0],
                  'score': 1.0}]
  json.dumps(results)  # Plain Python numbers only.

  metrics = coco_eval.evaluate_detections(gt, results)
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100', 'ARs', 'ARm', 'ARl'):
    assert metrics[name] == pytest.approx(1.0), name
  assert metrics['AR1'] < 1.0  # Image 7 has three objects: one detection cannot find them all.
  assert metrics['per_class_AP'] == {'car': pytest.approx(1.0), 'cat': pytest.approx(1.0),
                                     'bottle': -1.0, 'toothbrush': pytest.approx(1.0)}
  table = coco_eval.format_table(metrics)
  assert 'AP75' in table and 'bottle' in table and 'n/a' in table


def test_wrong_category_mapping_is_penalized():
  gt = _gt_dict()
  results = coco_eval.to_coco_results(_gt_as_detections(gt), list(reversed(_LABEL_TO_CAT)))
  assert coco_eval.evaluate_detections(gt, results)['AP'] < 0.5


def test_shifted_boxes_lower_ap75_not_ap50():
  gt = _gt_dict()
  dets = _gt_as_detections(gt)
  w = dets['boxes'][..., 2] - dets['boxes'][..., 0]
  dets['boxes'][..., 0] += 0.15 * w  # IoU 0.85 / 1.15 ~ 0.74 with the ground truth.
  dets['boxes'][..., 2] += 0.15 * w
  metrics = coco_eval.evaluate_detections(gt, coco_eval.to_coco_results(dets, _LABEL_TO_CAT))
  assert metrics['AP50'] == pytest.approx(1.0)
  assert metrics['AP75'] < 0.1


def test_empty_results_give_zeros():
  metrics = coco_eval.evaluate_detections(_gt_dict(), [])
  assert all(metrics[n] == 0.0 for n in coco_eval.METRIC_NAMES)
  assert metrics['per_class_AP'] == {'toothbrush': 0.0, 'car': 0.0, 'cat': 0.0, 'bottle': -1.0}



def test_categories_sharing_a_name_keep_one_per_class_ap_each():
  # Exports from labelling tools repeat names (a supercategory named like its class, or two
  # 'car' classes); keyed by name alone, one class's AP silently overwrote the other's.
  gt = _gt_dict()
  gt['categories'] = [dict(c, name='car') if c['id'] == 17 else c for c in _CATEGORIES]
  results = coco_eval.to_coco_results(_gt_as_detections(gt), _LABEL_TO_CAT)
  per_class = coco_eval.evaluate_detections(gt, results)['per_class_AP']
  assert per_class == {'car (id 3)': pytest.approx(1.0), 'car (id 17)': pytest.approx(1.0),
                       'bottle': -1.0, 'toothbrush': pytest.approx(1.0)}
  assert set(coco_eval.evaluate_detections(gt, [])['per_class_AP']) == set(per_class)

def test_only_the_evaluated_images_count():
  # Image 7 (three objects) was never seen by the detector, e.g. skipped as unreadable: with
  # image_ids it is left out instead of counting as three misses.
  gt = _gt_dict()
  results = [r for r in coco_eval.to_coco_results(_gt_as_detections(gt), _LABEL_TO_CAT)
             if r['image_id'] != 7]
  seen = [im['id'] for im in gt['images'] if im['id'] != 7]
  assert coco_eval.evaluate_detections(gt, results)['AR100'] < 1.0
  assert coco_eval.evaluate_detections(gt, results, image_ids=seen)['AR100'] == pytest.approx(1.0)
  with pytest.raises(ValueError, match='outside image_ids'):
    coco_eval.evaluate_detections(gt, results, image_ids=seen[:1])
  with pytest.raises(ValueError, match='not in the ground truth'):
    coco_eval.evaluate_detections(gt, results, image_ids=seen + [999])


def test_unknown_image_id_is_an_error():
  with pytest.raises(ValueError, match='not in the ground truth'):
    coco_eval.evaluate_detections(
        _gt_dict(), [{'image_id': 999, 'category_id': 3, 'bbox': [0, 0, 1, 1], 'score': 1.0}])


def test_bad_label_is_an_error():
  dets = _gt_as_detections(_gt_dict())
  dets['labels'][0, 0] = 4
  with pytest.raises(ValueError, match='num_classes'):
    coco_eval.to_coco_results(dets, _LABEL_TO_CAT)


def test_dedupe_keeps_each_valid_image_once():
  dets = {'image_id': np.array([5, 6, 5, 7, 0, 6]),
          'example_valid': np.array([True, True, True, False, False, True]),
          'scores': np.array([[0.1], [0.2], [0.3], [0.4], [0.5], [0.6]])}
  out = coco_eval.dedupe_by_image_id(dets)
  np.testing.assert_array_equal(out['image_id'], [5, 6])
  np.testing.assert_array_equal(out['scores'], [[0.1], [0.2]])
  # Padding rows only for an id: the image is dropped, not counted.
  assert 7 not in out['image_id']


def test_accumulator_concatenates_batches():
  acc = coco_eval.DetectionAccumulator()
  for b in range(3):
    acc.add(np.array([b]), np.array([True]), np.zeros([1, 2, 4]), np.zeros([1, 2]),
            np.zeros([1, 2], np.int32), np.zeros([1, 2], bool))
  arrays = acc.arrays()
  np.testing.assert_array_equal(arrays['image_id'], [0, 1, 2])
  assert arrays['boxes'].shape == (3, 2, 4)


_GATHER_WORKER = textwrap.dedent('''
  import sys
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  port, pid = sys.argv[1], int(sys.argv[2])
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
  import json
  import numpy as np
  from retina_jax.evaluation import coco_eval
  # Host 0 saw images 1, 2, 3; host 1 saw 3 again (the last batch wrapped), 2**33 + 4 (ids
  # past int32 must survive the gather) and two eval-padding rows: the hosts hold different
  # row counts.
  ids = [[1, 2, 3], [3, 2**33 + 4, 0, 0]][pid]
  ok = [[True, True, True], [True, True, False, False]][pid]
  local = {'image_id': np.array(ids, np.int64), 'example_valid': np.array(ok),
           'boxes': np.full([len(ids), 2, 4], pid, np.float32),
           'scores': np.full([len(ids), 2], 0.5 + pid, np.float32),
           'labels': np.zeros([len(ids), 2], np.int32),
           'valid': np.ones([len(ids), 2], bool)}
  out = coco_eval.gather_and_dedupe(local)
  print('RESULT', json.dumps({'ids': out['image_id'].tolist(),
                              'scores': out['scores'][:, 0].tolist()}))
''')


@pytest.mark.slow
def test_gather_across_two_processes_counts_each_image_once(tmp_path):
  outs = [json.loads(out.split('RESULT', 1)[1])
          for out in tiny_detector.run_workers(tmp_path, _GATHER_WORKER)]
  assert outs[0] == outs[1]  # Every host ends with the same global list.
  assert outs[0]['ids'] == [1, 2, 3, 2**33 + 4]
  assert outs[0]['scores'] == [0.5, 0.5, 0.5, 1.5]  # Image 3 from host 0 (first seen) only.


# End to end on the integrated code: a tiny random model on a small COCO-layout directory.


def _write_checkpoint(workdir, variables, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from retina_jax import checkpoint  # pylint: disable=g-import-not-at-top
  manager = checkpoint.make_manager(str(workdir), 1, async_save=False)
  manager.save(step, args=ocp.args.StandardSave(
      {'step': np.int32(step), 'params': variables['params'],
       'batch_stats': variables['batch_stats'], 'opt_state': {'momentum': np.zeros(3)}}))
  manager.wait_until_finished()


@pytest.fixture(scope='module')
def coco_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('coco')
  return root, tiny_detector.write_coco_dir(str(root))


@pytest.mark.slow
@pytest.mark.parametrize('sizes', [None, (64, 128, 160)])
def test_evaluate_variables_matches_single_image_prediction(coco_dir, tmp_path, sizes):
  from retina_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from retina_jax import inference  # pylint: disable=g-import-not-at-top
  from retina_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  root, gt = coco_dir
  config = tiny_detector.coco_dir_config(root)
  if sizes:  # Landscape and portrait canvases differ (64 x 128 and 128 x 64, not 160 x 160).
    config.data.min_size, config.data.max_size, config.data.image_size = sizes
  config.num_demo_pictures = 2
  variables = tiny_detector.random_variables(config)
  # 6 images, global batch 4 over the 4 fake devices: the second batch has 2 padding rows.
  metrics = evaluator.evaluate_variables(config, variables, str(tmp_path))
  assert set(coco_eval.METRIC_NAMES) <= set(metrics)
  assert set(metrics['per_class_AP']) == set(tiny_detector.CATEGORIES.names)
  assert all(0.0 <= metrics[n] <= 1.0 or metrics[n] == -1.0 for n in coco_eval.METRIC_NAMES)
  assert json.loads((tmp_path / 'metrics_val.json').read_text()) == metrics
  assert (tmp_path / 'predictions_val.png').exists()
  results = json.loads((tmp_path / 'detections_val.json').read_text())

  # Oracle: the same model, one image at a time through the predict path.
  detect = inference.make_detect_fn(config)
  expected = []
  for im in gt['images']:
    image = predict_lib.load_image(str(root / 'val' / im['file_name']))
    for d in predict_lib.predict(config, variables, image, tiny_detector.CATEGORIES, detect):
      expected.append({'image_id': im['id'], 'category_id': d['category_id'],
                       'bbox': d['bbox'], 'score': d['score']})
  assert len(results) == len(expected)
  assert {r['image_id'] for r in results} == {im['id'] for im in gt['images']}
  key = lambda r: (r['image_id'], -round(r['score'], 4), r['category_id'])
  for got, want in zip(sorted(results, key=key), sorted(expected, key=key)):
    assert got['image_id'] == want['image_id'] and got['category_id'] == want['category_id']
    assert got['score'] == pytest.approx(want['score'], abs=1e-4)
    np.testing.assert_allclose(got['bbox'], want['bbox'], atol=1e-2)
  assert coco_eval.evaluate_detections(gt, expected)['AP'] == pytest.approx(metrics['AP'],
                                                                            abs=1e-6)


@pytest.mark.slow
def test_skipped_unreadable_image_is_left_out_of_the_metrics(coco_dir, tmp_path, monkeypatch):
  from retina_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  calls = []
  real, real_share = coco_eval.evaluate_detections, coco_eval.match_share
  monkeypatch.setattr(coco_eval, 'match_share',
                      lambda gt, results, image_ids=None, **kw: calls.append(image_ids) or
                      real_share(gt, results, image_ids, **kw))
  src_root, gt = coco_dir
  root = shutil.copytree(src_root, tmp_path / 'data')
  victim = gt['images'][0]
  path = root / 'val' / victim['file_name']
  path.write_bytes(path.read_bytes()[:100])  # Truncated.
  config = tiny_detector.coco_dir_config(str(root))
  config.data.skip_bad_images = True
  variables = tiny_detector.random_variables(config)
  metrics = evaluator.evaluate_variables(config, variables, str(tmp_path / 'out'))
  results = json.loads((tmp_path / 'out' / 'detections_val.json').read_text())
  assert victim['id'] not in {r['image_id'] for r in results}
  seen = [im['id'] for im in gt['images'] if im['id'] != victim['id']]
  assert len(calls) == 1 and sorted(calls[0]) == sorted(seen)  # Random weights: AP ~0 either way.
  want = real(gt, results, image_ids=seen)
  assert {n: metrics[n] for n in coco_eval.METRIC_NAMES} == {
      n: want[n] for n in coco_eval.METRIC_NAMES}


@pytest.mark.slow
def test_evaluate_cli_on_a_checkpoint(coco_dir, tmp_path):
  root, gt = coco_dir
  config = tiny_detector.coco_dir_config(root)
  variables = tiny_detector.random_variables(config)
  workdir = tmp_path / 'run'
  _write_checkpoint(workdir, variables, step=7)
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  env = tiny_detector.subprocess_env()
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.evaluate', f'--workdir={workdir}',
                         '--config.postprocess.max_detections=3'],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step 7' in proc.stdout and 'AP50' in proc.stdout and 'triangle' in proc.stdout
  results = json.loads((workdir / 'detections_val.json').read_text())
  per_image = {}
  for r in results:
    per_image[r['image_id']] = per_image.get(r['image_id'], 0) + 1
  assert per_image == {im['id']: 3 for im in gt['images']}  # The override reached the detector.
  metrics = json.loads((workdir / 'metrics_val.json').read_text())
  assert metrics == coco_eval.evaluate_detections(gt, results)


_EVAL_WORKER = textwrap.dedent('''
  import sys
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  port, pid, root, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
  from retina_jax.evaluation import evaluator
  from tests import tiny_detector
  config = tiny_detector.coco_dir_config(root)
  variables = tiny_detector.random_variables(config)
  metrics = evaluator.evaluate_variables(config, variables, out if pid == 0 else '')
  print('AP', metrics['AP'])
''')


@pytest.mark.slow
def test_two_host_evaluation_equals_one_host(coco_dir, tmp_path):
  """2 processes x 2 devices, global eval batch 4 split 2 + 2, 6 images: same detections."""
  from retina_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  root, _ = coco_dir
  out = tmp_path / 'two_hosts'
  tiny_detector.run_workers(tmp_path, _EVAL_WORKER, str(root), str(out), devices=2, timeout=300)
  two = json.loads((out / 'detections_val.json').read_text())

  config = tiny_detector.coco_dir_config(root)
  one_dir = tmp_path / 'one_host'
  evaluator.evaluate_variables(config, tiny_detector.random_variables(config), str(one_dir))
  one = json.loads((one_dir / 'detections_val.json').read_text())
  key = lambda r: (r['image_id'], -round(r['score'], 4), r['category_id'])
  assert len(two) == len(one)
  for a, b in zip(sorted(two, key=key), sorted(one, key=key)):
    assert (a['image_id'], a['category_id']) == (b['image_id'], b['category_id'])
    assert a['score'] == pytest.approx(b['score'], abs=1e-4)
    np.testing.assert_allclose(a['bbox'], b['bbox'], atol=1e-2)
  assert json.loads((out / 'metrics_val.json').read_text())['AP'] == pytest.approx(
      json.loads((one_dir / 'metrics_val.json').read_text())['AP'])


def test_detector_cache_keeps_the_last_ones_used():
  from retina_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from retina_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  cache = evaluator._Detectors(size=2)  # pylint: disable=protected-access
  configs = []
  for channels in (8, 16, 32):
    config = tiny_detector.tiny_config()
    config.model.head_channels = channels
    configs.append(config)
  mesh = sharding_lib.make_mesh(configs[0])
  first = cache.get(configs[0], mesh)
  assert cache.get(configs[0], mesh) is first  # Compiled once per (config, mesh).
  cache.get(configs[1], mesh)
  cache.get(configs[0], mesh)  # Used last: kept when a third comes.
  cache.get(configs[2], mesh)
  assert len(cache) == 2 and cache.get(configs[0], mesh) is first
