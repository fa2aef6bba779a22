"""Anchor coverage: best-anchor IoU against a brute-force numpy oracle, size classes, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retina_jax import anchors as anchors_lib
from retina_jax.config import get_base_config
from retina_jax.tools import anchor_coverage
from tests import tiny_detector


def _config():
  config = get_base_config()
  config.data.min_size = 128
  config.data.max_size = 256
  config.data.image_size = 256
  config.anchors.sizes = (16.0, 32.0, 64.0, 128.0, 256.0)
  return config


def _numpy_iou(a, b):
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _gt():
  # 400x200 original (h x w): scale = min(128 / 200, 256 / 400) = 0.64.
  images = [{'id': 1, 'height': 400, 'width': 200}, {'id': 2, 'height': 100, 'width': 100}]
  anns = [
      # 25x25 original = 16x16 resized, centred on a P3 anchor at (8 * 2.5, 8 * 2.5) = (20, 20).
      {'image_id': 1, 'bbox': [20 / 0.64 - 12.5, 20 / 0.64 - 12.5, 25, 25], 'iscrowd': 0,
       'area': 625.0},
      {'image_id': 1, 'bbox': [10, 10, 150, 300], 'iscrowd': 0, 'area': 45000.0},
      {'image_id': 1, 'bbox': [0, 0, 200, 400], 'iscrowd': 1, 'area': 80000.0},  # Crowd: skipped.
      {'image_id': 2, 'bbox': [40, 40, 3, 40], 'iscrowd': 0},  # Thin; area from the box: 120.
      {'image_id': 2, 'bbox': [5, 5, 50, 50], 'iscrowd': 0, 'area': 2500.0},  # Medium.
  ]
  return {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'x'}]}


def test_coverage_matches_numpy_oracle():
  config = _config()
  boxes, areas = anchor_coverage.resized_boxes(_gt(), config.data)
  assert boxes.shape == (4, 4)
  np.testing.assert_allclose(boxes[0], [12, 12, 28, 28], atol=1e-4)
  # Image 2 is 100x100: scale = 128 / 100, and the boxes scale with it.
  np.testing.assert_allclose(boxes[3], np.array([5, 5, 55, 55]) * 1.28, rtol=1e-6)
  np.testing.assert_array_equal(areas, [625.0, 45000.0, 120.0, 2500.0])

  anchors = anchors_lib.generate_anchors(config.anchors, 3, 7, (256, 256))
  best = anchor_coverage.best_anchor_iou(boxes, anchors)
  np.testing.assert_allclose(best, _numpy_iou(boxes, anchors).max(axis=1), rtol=1e-5)
  assert best[0] == pytest.approx(1.0)  # Exactly a P3 anchor (size 16, ratio 1).

  result = anchor_coverage.coverage(config, _gt())
  assert result['all']['count'] == 4
  assert [result[s]['count'] for s in ('small', 'medium', 'large')] == [2, 1, 1]
  for t in (0.5, 0.4):
    assert result['all'][f'iou>={t}'] == pytest.approx(np.mean(best >= t))
    assert result['small'][f'iou>={t}'] == pytest.approx(np.mean(best[[0, 2]] >= t))
  assert result['small']['iou>=0.5'] == 0.5  # The thin box has no good anchor.
  assert 'small' in anchor_coverage.format_table(result)


def test_size_without_boxes_is_reported_not_nan():
  gt = _gt()
  gt['annotations'] = [a for a in gt['annotations'] if a.get('area', 0) != 45000.0]
  result = anchor_coverage.coverage(_config(), gt)
  assert result['large'] == {'count': 0, 'iou>=0.5': None, 'iou>=0.4': None,
                             'mean_best_iou': None}
  assert 'n/a' in anchor_coverage.format_table(result)
  json.dumps(result, allow_nan=False)


@pytest.mark.slow
def test_cli_on_a_coco_format_directory(tmp_path):
  root = tmp_path / 'data'
  (root / 'annotations').mkdir(parents=True)
  (root / 'train').mkdir()
  gt = _gt()
  for im in gt['images']:
    im['file_name'] = f'{im["id"]}.png'
    Image.new('RGB', (im['width'], im['height'])).save(root / 'train' / im['file_name'])
  for k, a in enumerate(gt['annotations']):
    a['id'] = k + 1
    a['category_id'] = 1
  (root / 'annotations' / 'instances_train.json').write_text(json.dumps(gt))
  config_file = tmp_path / 'cfg.py'
  config_file.write_text(
      'from tests.test_anchor_coverage import _config\n'
      'def get_config():\n'
      '  c = _config()\n'
      "  c.data.name = 'coco_format'\n"
      f"  c.data.root = {str(root)!r}\n"
      "  c.data.train_split = 'train'\n"
      '  return c\n')
  out = tmp_path / 'coverage.json'
  env = tiny_detector.subprocess_env()
  proc = subprocess.run([sys.executable, '-m', 'retina_jax.tools.anchor_coverage',
                         f'--config={config_file}', '--config.anchors.offset=0.5',
                         f'--json={out}'], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'IoU>=0.5' in proc.stdout
  written = json.loads(out.read_text())
  assert written['coverage']['all']['count'] == 4
  assert written['coverage'] == anchor_coverage.coverage(_config(), _gt())
