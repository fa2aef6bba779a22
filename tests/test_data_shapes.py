"""The synthetic shapes set: deterministic, cached by its parameters, and as varied as promised."""

import filecmp
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from retina_jax import config as config_lib
from retina_jax.data import pipeline, shapes


def _load(root, split='train'):
  with open(os.path.join(root, 'annotations', f'instances_{split}.json')) as f:
    return json.load(f)


def test_same_parameters_same_files(tmp_path):
  a = shapes.ensure_shapes(str(tmp_path / 'a'), 6, 2, seed=3)
  b = shapes.ensure_shapes(str(tmp_path / 'b'), 6, 2, seed=3)
  assert os.path.basename(a) == os.path.basename(b)
  for split in shapes.SPLITS:
    assert _load(a, split) == _load(b, split)
    names = sorted(os.listdir(os.path.join(a, split)))
    _, mismatch, errors = filecmp.cmpfiles(os.path.join(a, split), os.path.join(b, split), names,
                                           shallow=False)
    assert not mismatch and not errors
  c = shapes.ensure_shapes(str(tmp_path / 'a'), 6, 2, seed=4)
  assert c != a and _load(c) != _load(a)


def test_cached_data_set_is_reused(tmp_path):
  first = shapes.ensure_shapes(str(tmp_path), 4, 2, seed=0)
  stamp = os.stat(os.path.join(first, 'annotations', 'instances_train.json')).st_mtime_ns
  assert shapes.ensure_shapes(str(tmp_path), 4, 2, seed=0) == first
  assert os.stat(os.path.join(first, 'annotations', 'instances_train.json')).st_mtime_ns == stamp
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []  # No temporary leftovers.


def test_contents_cover_the_hard_cases(tmp_path):
  root = shapes.ensure_shapes(str(tmp_path), 80, 2, seed=0)
  data = _load(root)
  ids = [c['id'] for c in data['categories']]
  assert ids != sorted(ids) and sorted(ids) != list(range(1, len(ids) + 1))
  sizes = {im['id']: (im['width'], im['height']) for im in data['images']}
  assert any(w != h for w, h in sizes.values())
  assert all(128 <= s <= 192 for wh in sizes.values() for s in wh)
  annotated = {a['image_id'] for a in data['annotations'] if not a['iscrowd']}
  assert len(annotated) < len(sizes)  # Some images have no objects.
  assert any(a['iscrowd'] for a in data['annotations'])
  boxes = np.asarray([a['bbox'] for a in data['annotations'] if not a['iscrowd']], float)
  assert boxes[:, 2:].min() <= 8 and boxes[:, 2:].max() >= 100  # Tiny and large objects.
  aspect = boxes[:, 3] / boxes[:, 2]
  assert aspect.min() < 0.45 and aspect.max() > 2.2
  for a in data['annotations']:
    x, y, w, h = a['bbox']
    iw, ih = sizes[a['image_id']]
    assert 0 <= x and 0 <= y and x + w <= iw and y + h <= ih and w > 0 and h > 0


def test_every_shape_fills_its_box_exactly():
  rng = np.random.default_rng(0)
  for _, name in shapes.CATEGORIES:
    for box in [(3, 5, 9, 11), (10, 4, 47, 20), (0, 0, 64, 64)]:
      canvas = Image.new('L', (64, 64))
      shapes._draw_shape(ImageDraw.Draw(canvas), rng, name, box, 255)
      ys, xs = np.nonzero(np.asarray(canvas))
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box, (name, box)


def test_create_source_uses_the_default_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  cfg = config_lib.get_base_config().data
  cfg.name, cfg.root, cfg.shapes_num_train, cfg.shapes_num_eval = 'shapes', '', 5, 3
  src = pipeline.create_source(cfg, 'validation')
  assert len(src) == 3 and src.categories.ids == (1, 3, 7, 12, 20)
  assert os.path.basename(os.path.dirname(os.path.dirname(src.ann_file))).startswith('shapes-')
  assert src.ann_file.startswith(os.path.join(str(tmp_path), 'retina_jax'))
