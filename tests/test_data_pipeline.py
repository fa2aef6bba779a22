"""The pipeline: resize/flip/pad against numpy oracles, resume determinism, hosts, eval coverage.

The index stream alone (which examples, flips and canvases each batch gets) is tested without
images in test_data_sampler.py."""

import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from retina_jax import config as config_lib
from retina_jax.data import canvas as canvas_lib
from retina_jax.data import pipeline
from retina_jax.data import resize
from retina_jax.data import sampler
from retina_jax.data.preprocess import normalize_images, preprocess
from retina_jax.data.coco_format import BadImageError
from tests.test_data_sampler import SizedSource

NUM_TRAIN, NUM_EVAL = 11, 7


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
  cfg = _config(str(tmp_path_factory.mktemp('shapes')))
  pipeline.create_source(cfg, 'train')  # Generates.
  return cfg.root


def _config(root, **overrides):
  cfg = config_lib.get_base_config().data
  cfg.name, cfg.root = 'shapes', root
  cfg.shapes_num_train, cfg.shapes_num_eval = NUM_TRAIN, NUM_EVAL
  cfg.min_size, cfg.max_size, cfg.image_size, cfg.max_boxes = 128, 192, 128, 12
  cfg.num_workers = 2
  cfg.update(overrides)
  return cfg


def data_config(min_size, max_size, image_size, max_boxes, **fields):
  """config.data with the resize rule's sizes and max_boxes, as `preprocess` reads them."""
  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size = min_size, max_size, image_size
  cfg.max_boxes = max_boxes
  cfg.update(fields)
  return cfg


def _example(h=30, w=40, n=3, crowd=(False, True, False)):
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 15, (n, 2))
  return {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          'boxes': np.concatenate([xy, xy + rng.uniform(2, 14, (n, 2))], 1).astype(np.float32),
          'labels': np.arange(n, dtype=np.int32) + 1, 'is_crowd': np.asarray(crowd),
          'image_id': 42}


@pytest.mark.parametrize('flip', [False, True])
def test_preprocess_matches_numpy_oracle(flip):
  ex = _example()
  row = preprocess(ex, data_config(64, 100, 128, 5), flip=flip)
  scale = 64 / 30
  nh, nw = 64, round(40 * scale)
  np.testing.assert_array_equal(row['scale'], [np.float32(scale)] * 2)
  np.testing.assert_array_equal(row['image_hw'], [nh, nw])
  np.testing.assert_array_equal(row['orig_hw'], [30, 40])
  resized = np.asarray(Image.fromarray(ex['image']).resize((nw, nh), Image.BILINEAR))
  boxes = ex['boxes'] * scale
  if flip:
    resized = resized[:, ::-1]
    boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
  np.testing.assert_array_equal(row['image'][:nh, :nw], resized)
  assert not row['image'][nh:].any() and not row['image'][:, nw:].any()
  order = [0, 2, 1]  # Crowd regions go last.
  np.testing.assert_allclose(row['boxes'][:3], boxes[order], rtol=1e-6)
  np.testing.assert_array_equal(row['labels'], [1, 3, 2, 0, 0])
  np.testing.assert_array_equal(row['is_crowd'], [False, False, True, False, False])
  np.testing.assert_array_equal(row['box_valid'], [True] * 3 + [False] * 2)
  assert not row['boxes'][3:].any()
  assert row['image_id'] == 42 and row['example_valid']


def test_resize_caps_and_max_boxes():
  ex = _example(h=30, w=120, n=4, crowd=(True, False, False, False))
  row = preprocess(ex, data_config(64, 200, 128, 2))
  np.testing.assert_array_equal(row['image_hw'], [32, 128])  # Bucket cap beats max_size.
  np.testing.assert_array_equal(row['scale'], [np.float32(128 / 120)] * 2)
  np.testing.assert_array_equal(row['labels'], [2, 3])  # Crowd dropped first, then the last.
  assert row['box_valid'].all() and not row['is_crowd'].any()
  assert resize.resize_scale(800, 1200, 800, 1333, 1408) == 1.0
  assert resize.resize_scale(400, 1200, 800, 1333, 1408) == 1333 / 1200


@pytest.mark.parametrize('flip', [False, True])
def test_extremely_elongated_image_keeps_a_one_pixel_side(flip):
  # 3 x 1000 into a 128 bucket: round(3 * 0.128) = 0 rows made PIL's resize fail.
  rng = np.random.default_rng(0)
  ex = {'image': rng.integers(0, 256, (3, 1000, 3), dtype=np.uint8),
        'boxes': np.asarray([[100, 0, 600, 3]], np.float32), 'labels': np.zeros(1, np.int32),
        'is_crowd': np.zeros(1, bool), 'image_id': 7}
  row = preprocess(ex, data_config(128, 128, 128, 2), flip=flip)
  np.testing.assert_array_equal(row['image_hw'], [1, 128])
  assert row['image'][1:].max() == 0 and row['image'][0].max() > 0
  expected = [51.2, 0, 115.2, 0.384] if flip else [12.8, 0, 76.8, 0.384]  # Boxes * 0.128.
  np.testing.assert_allclose(row['boxes'][0], expected, rtol=1e-6)

def test_normalize_images_matches_oracle_and_zeros_padding():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  hw = np.asarray([[5, 8], [8, 3]], np.int32)
  mean, std = (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)
  got = np.asarray(jax.jit(normalize_images, static_argnums=(2, 3))(images, hw, mean, std))
  want = (images - np.asarray(mean)) / np.asarray(std)
  want[0, 5:] = 0
  want[1, :, 3:] = 0
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert (got[0, 5:] == 0).all() and (got[1, :, 3:] == 0).all()


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


# Every augmentation on: multi-scale, large-scale jitter with crops, photometric, flips, turns.
AUGMENTED = {'train_min_sizes': (96, 128), 'scale_jitter': (0.1, 2.0), 'random_vflip': True,
             'random_rot90': True, 'brightness': 0.3, 'contrast': 0.3, 'saturation': 0.3,
             'hue': 0.05}


@pytest.mark.parametrize('augmented', [False, True])
def test_batches_are_a_pure_function_of_seed_and_step(shapes_root, augmented):
  aug = AUGMENTED if augmented else {}
  cfg = _config(shapes_root, **aug)
  src = pipeline.create_source(cfg, 'train')
  loader = pipeline.TrainLoader(src, cfg, 4, seed=1, process_index=0, process_count=1)
  it = loader.iterate(0)
  straight = [next(it) for _ in range(6)]
  it.close()
  other = pipeline.TrainLoader(src, _config(shapes_root, num_workers=1, prefetch_batches=1, **aug),
                               4, seed=1, process_index=0, process_count=1)
  resumed = other.iterate(3)
  for step in range(3, 6):
    assert _equal(next(resumed), straight[step])
  assert _equal(other.batch(1), straight[1])
  reseeded = pipeline.TrainLoader(src, cfg, 4, seed=2, process_index=0, process_count=1)
  assert not np.array_equal(reseeded.batch(0)['image_id'], straight[0]['image_id'])


def test_each_epoch_sees_every_example_once_across_batch_boundaries(shapes_root):
  cfg = _config(shapes_root)
  loader = pipeline.TrainLoader(pipeline.create_source(cfg, 'train'), cfg, 4, seed=0,
                                process_index=0, process_count=1)
  order = np.concatenate([loader.example_indices(s)[0] for s in range(9)])  # 36 = 3 epochs + 3.
  epochs = [order[e * NUM_TRAIN:(e + 1) * NUM_TRAIN] for e in range(3)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  flips = np.concatenate([loader.example_indices(s)[1] for s in range(9)])
  assert 0 < flips.sum() < len(flips)


def test_flip_mirrors_boxes_and_pixels(shapes_root):
  src = pipeline.create_source(_config(shapes_root), 'train')
  flipped = pipeline.TrainLoader(src, _config(shapes_root), 8, seed=0, process_index=0,
                                 process_count=1)
  plain = pipeline.TrainLoader(src, _config(shapes_root, random_flip=False), 8, seed=0,
                               process_index=0, process_count=1)
  a, b = flipped.batch(0), plain.batch(0)
  np.testing.assert_array_equal(a['image_id'], b['image_id'])
  flips = flipped.example_indices(0)[1]
  for r in range(8):
    h, w = b['image_hw'][r]
    bb = b['boxes'][r][b['box_valid'][r]]
    ab = a['boxes'][r][a['box_valid'][r]]
    if flips[r]:
      np.testing.assert_array_equal(a['image'][r, :h, :w], b['image'][r, :h, :w][:, ::-1])
      np.testing.assert_allclose(ab, np.stack([w - bb[:, 2], bb[:, 1], w - bb[:, 0], bb[:, 3]], 1))
    else:
      np.testing.assert_array_equal(ab, bb)


@pytest.mark.parametrize('augmented', [False, True])
def test_hosts_take_their_rows_of_the_same_global_batch(shapes_root, augmented):
  cfg = _config(shapes_root, **(AUGMENTED if augmented else {}))
  src = pipeline.create_source(cfg, 'train')
  whole = pipeline.TrainLoader(src, cfg, 6, seed=0, process_index=0, process_count=1).batch(2)
  parts = [pipeline.TrainLoader(src, cfg, 6, seed=0, process_index=i, process_count=3).batch(2)
           for i in range(3)]
  assert parts[0]['image'].shape[0] == 2
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.TrainLoader(src, cfg, 5, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize('num_images', [0, 5])
def test_eval_sees_every_image_once_across_hosts(shapes_root, num_images):
  cfg = _config(shapes_root)
  src = pipeline.create_source(cfg, 'validation')
  n = num_images or NUM_EVAL
  per_host = [list(pipeline.eval_batches(src, cfg, 4, process_index=i, process_count=2,
                                         num_images=num_images)) for i in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == sampler.num_eval_batches(n, 4)
  ids = np.concatenate([b['image_id'][b['example_valid']] for bs in per_host for b in bs])
  np.testing.assert_array_equal(np.sort(ids), np.sort(src.image_ids[:n]))
  padding = np.concatenate([b['image_id'][~b['example_valid']] for bs in per_host for b in bs])
  assert len(padding) == 8 * sampler.num_eval_batches(n, 4) // 2 - n and (padding == -1).all()
  first = per_host[0][0]
  assert first['image'].shape == (2, 128, 128, 3)
  np.testing.assert_array_equal(first['orig_hw'][0], src.original_hw[0])
  np.testing.assert_allclose(first['scale'][0], first['image_hw'][0] / src.original_hw[0],
                             rtol=0.02)
  gt = src.coco_gt(num_images)
  assert sorted(im['id'] for im in gt['images']) == sorted(ids.tolist())


def test_augmentations_leave_evaluation_untouched(shapes_root):
  src = pipeline.create_source(_config(shapes_root), 'validation')
  plain = list(pipeline.eval_batches(src, _config(shapes_root), 4, process_index=0,
                                     process_count=1, image_hw=src.original_hw))
  augmented = list(pipeline.eval_batches(src, _config(shapes_root, **AUGMENTED), 4,
                                         process_index=0, process_count=1,
                                         image_hw=src.original_hw))
  assert len(plain) == len(augmented)
  for a, b in zip(plain, augmented):
    assert _equal(a, b)


def test_augmented_training_changes_pixels_and_boxes_but_keeps_ids(shapes_root):
  src = pipeline.create_source(_config(shapes_root), 'train')
  plain = pipeline.TrainLoader(src, _config(shapes_root), 8, seed=0, process_index=0,
                               process_count=1)
  augmented = pipeline.TrainLoader(src, _config(shapes_root, **AUGMENTED), 8, seed=0,
                                   process_index=0, process_count=1)
  a, b = plain.batch(0), augmented.batch(0)
  np.testing.assert_array_equal(a['image_id'], b['image_id'])
  np.testing.assert_array_equal(plain.example_indices(0)[1], augmented.example_indices(0)[1])
  assert not np.array_equal(a['image'], b['image']) and not np.array_equal(a['scale'], b['scale'])
  np.testing.assert_array_equal(a['orig_hw'], b['orig_hw'])
  assert b['image'].shape == a['image'].shape and b['boxes'].shape == a['boxes'].shape


def test_multiscale_orientation_canvases_hold_the_largest_size_and_turns_need_squares():
  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size, cfg.num_workers = 64, 128, 128, 1
  cfg.train_buckets, cfg.train_min_sizes = 'orientation', (64, 96)
  src = SizedSource([(100, 200), (200, 100)] * 3)
  loader = pipeline.TrainLoader(src, cfg, 2, seed=0, process_index=0, process_count=1)
  assert loader.canvases == [(96, 128), (128, 96)]
  cfg.random_rot90 = True
  with pytest.raises(ValueError, match="train_buckets='square'"):
    pipeline.TrainLoader(src, cfg, 2, seed=0, process_index=0, process_count=1)


def test_eval_canvas_holds_every_resized_image():
  cfg = config_lib.get_base_config().data  # COCO's 800 / 1333 in a 1408 bucket.
  assert canvas_lib.eval_canvas(cfg, 480, 640) == (800, 1344)  # torchvision's canvas too.
  assert canvas_lib.eval_canvas(cfg, 640, 480) == (1344, 800)
  assert canvas_lib.eval_canvas(cfg, 500, 500) == (800, 1344)
  cfg.eval_buckets = 'square'
  assert canvas_lib.eval_canvas(cfg, 640, 480) == (1408, 1408)
  cfg.eval_buckets = 'round'
  with pytest.raises(ValueError, match='eval_buckets'):
    canvas_lib.eval_canvas(cfg, 640, 480)
  rng = np.random.default_rng(0)
  for _ in range(500):
    cfg = config_lib.get_base_config().data
    cfg.min_size, cfg.max_size = (int(v) for v in rng.integers(16, 1500, 2))
    cfg.image_size = 32 * int(rng.integers(1, 50))
    h, w = (int(v) for v in np.exp(rng.uniform(0, 8, 2)).round() + 1)
    scale = resize.resize_scale(h, w, cfg.min_size, cfg.max_size, cfg.image_size)
    nh, nw = resize.resized_hw(h, w, scale, cfg.image_size)
    ch, cw = canvas_lib.eval_canvas(cfg, h, w)
    assert nh <= ch <= cfg.image_size and nw <= cw <= cfg.image_size, (cfg, h, w)
    assert ch % 32 == 0 and cw % 32 == 0


def test_torchvision_canvas_is_the_resized_sides_rounded_up_to_32():
  cfg = config_lib.get_base_config().data
  cfg.resize = cfg.eval_buckets = 'torchvision'
  assert canvas_lib.eval_canvas(cfg, 480, 640) == (800, 1088)  # Resized 800 x 1066.
  assert canvas_lib.eval_canvas(cfg, 640, 427) == (1216, 800)  # 1199 x 800.
  assert canvas_lib.eval_canvas(cfg, 360, 640) == (768, 1344)  # Capped: 749 x 1333.
  # The bound the README states for 800 / 1333: 83 canvases, whatever the sizes.
  sides = range(16, 4000, 13)
  canvases = {canvas_lib.eval_canvas(cfg, h, w) for h in sides for w in sides}
  assert 75 < len(canvases) <= 83


def test_eval_batches_in_orientation_canvases_across_hosts(shapes_root):
  cfg = _config(shapes_root, min_size=64, max_size=128, image_size=128)
  src = pipeline.create_source(cfg, 'validation')
  hw = src.original_hw
  per_host = [list(pipeline.eval_batches(src, cfg, 4, process_index=i, process_count=2,
                                         image_hw=hw)) for i in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == len(sampler.eval_plan(cfg, 4, hw))
  index = {int(i): k for k, i in enumerate(src.image_ids)}
  seen = []
  for b0, b1 in zip(*per_host):
    assert b0['image'].shape == b1['image'].shape  # One canvas per global batch.
    for b in (b0, b1):
      for r in np.flatnonzero(b['example_valid']):
        h, w = hw[index[int(b['image_id'][r])]]
        assert b['image'].shape[1:3] == canvas_lib.eval_canvas(cfg, h, w)
        assert (b['image_hw'][r] <= b['image'].shape[1:3]).all()
        seen.append(int(b['image_id'][r]))
  assert sorted(seen) == sorted(src.image_ids.tolist())
  assert {b['image'].shape[1:3] for b in per_host[0]} == {(64, 128), (128, 64)}
  # Without sizes, or with 'square', the batches are the S x S bucket, in source order.
  cfg.eval_buckets = 'square'
  (first, *_) = pipeline.eval_batches(src, cfg, 4, process_index=0, process_count=1, image_hw=hw)
  assert first['image'].shape == (4, 128, 128, 3)
  np.testing.assert_array_equal(first['image_id'], src.image_ids[:4])


def test_unreadable_image_fails_or_is_skipped(shapes_root, tmp_path):
  root = shutil.copytree(shapes_root, tmp_path / 'copy')
  data_dir = next(p for p in root.iterdir() if p.name.startswith('shapes-'))
  victim = sorted((data_dir / 'train').iterdir())[0]
  victim.write_bytes(victim.read_bytes()[:100])  # Truncated JPEG.
  cfg = _config(str(root))
  src = pipeline.create_source(cfg, 'train')
  loader = pipeline.TrainLoader(src, cfg, NUM_TRAIN, seed=0, process_index=0, process_count=1)
  with pytest.raises(BadImageError, match=rf'{victim.name}.*image id 1\b') as e:
    next(loader.iterate(0))
  assert 'config.data.skip_bad_images=True' in ' '.join(e.value.__notes__)  # What to do.
  cfg = _config(str(root), skip_bad_images=True)
  batch = pipeline.TrainLoader(src, cfg, NUM_TRAIN, seed=0, process_index=0,
                               process_count=1).batch(0)
  bad = batch['image_id'] == 1
  assert bad.sum() == 1 and not batch['example_valid'][bad].any()
  assert batch['example_valid'][~bad].all() and not batch['box_valid'][bad].any()


def test_image_size_must_be_a_multiple_of_32(shapes_root):
  cfg = _config(shapes_root, image_size=200)
  with pytest.raises(ValueError, match='multiple of 32'):
    pipeline.TrainLoader(pipeline.create_source(cfg, 'train'), cfg, 2, seed=0, process_index=0,
                         process_count=1)


def test_bad_source_names():
  cfg = _config('')
  cfg.name = 'coco_format'
  with pytest.raises(ValueError, match='config.data.root'):
    pipeline.create_source(cfg, 'train')
  cfg.name = 'shapes'
  cfg.root = os.devnull + '_never_used'
  with pytest.raises(ValueError, match="not 'val2017'"):
    pipeline.create_source(cfg, 'val2017')


def test_too_many_objects_are_counted_at_start_up(shapes_root, caplog):
  cfg = _config(shapes_root, max_boxes=1)
  src = pipeline.create_source(cfg, 'train')
  with caplog.at_level('WARNING'):
    loader = pipeline.TrainLoader(src, cfg, 2, seed=0, process_index=0, process_count=1)
  over = int((src.object_counts > 1).sum())
  assert over > 0 and f'{over} images have more than max_boxes=1' in caplog.text
  assert loader.batch(0)['box_valid'].sum(axis=1).max() == 1


def test_closing_the_iterator_stops_its_thread(shapes_root):
  cfg = _config(shapes_root, prefetch_batches=1)
  loader = pipeline.TrainLoader(pipeline.create_source(cfg, 'train'), cfg, 2, seed=0,
                                process_index=0, process_count=1)
  it = loader.iterate(0)
  next(it)
  it.close()
  deadline = time.monotonic() + 5
  while time.monotonic() < deadline and any(
      t.name == 'retina_jax-prefetch' for t in threading.enumerate()):
    time.sleep(0.05)
  assert not any(t.name == 'retina_jax-prefetch' for t in threading.enumerate())


def test_image_ids_past_int32_are_carried_exactly(tmp_path):
  # Real data sets use ids such as 20190101000042; an int32 batch field overflowed on them.
  import json  # pylint: disable=g-import-not-at-top
  import tiny_detector  # pylint: disable=g-import-not-at-top
  from retina_jax import train  # pylint: disable=g-import-not-at-top
  tiny_detector.write_coco_dir(str(tmp_path), split='train', sizes=((60, 80), (80, 60)))
  ann_file = tmp_path / 'annotations' / 'instances_train.json'
  gt = json.loads(ann_file.read_text())
  big = {im['id']: 2**31 + 5 + k * 2**33 for k, im in enumerate(gt['images'])}
  for item in gt['images']:
    item['id'] = big[item['id']]
  for item in gt['annotations']:
    item['image_id'] = big[item['image_id']]
  ann_file.write_text(json.dumps(gt))
  cfg = _config(str(tmp_path), name='coco_format')
  src = pipeline.create_source(cfg, 'train')
  (batch,) = pipeline.eval_batches(src, cfg, 4, process_index=0, process_count=1)
  assert batch['image_id'].tolist() == sorted(big.values()) + [-1, -1]
  batch = pipeline.TrainLoader(src, cfg, 2, seed=0, process_index=0, process_count=1).batch(0)
  assert sorted(batch['image_id'].tolist()) == sorted(big.values())
  assert 'image_id' not in train.train_inputs(batch)  # Stays on the host.
