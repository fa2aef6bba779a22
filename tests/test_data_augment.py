"""Training augmentations against numpy oracles: boxes drawn into the image land where the
transformed boxes say; crops keep valid boxes; draws are a pure function of (seed, position)."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from retina_jax import config as config_lib
from retina_jax.data import augment
from retina_jax.data.preprocess import preprocess
from tests.test_data_pipeline import data_config

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
IDENTITY = augment.Draw(min_size=64, jitter=1.0, crop=(0.0, 0.0), vflip=False, rot90=0,
                        brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)


def _painted(h=60, w=80):
  """Black image with three solid rectangles, one per colour; their boxes in pixels."""
  boxes = np.asarray([[4, 6, 30, 26], [40, 10, 76, 22], [20, 34, 52, 58]], np.float32)
  image = np.zeros((h, w, 3), np.uint8)
  for (x1, y1, x2, y2), colour in zip(boxes.astype(int), COLOURS):
    image[y1:y2, x1:x2] = colour
  return {'image': image, 'boxes': boxes, 'labels': np.arange(3, dtype=np.int32),
          'is_crowd': np.zeros(3, bool), 'image_id': 5}


def _found(image: np.ndarray, colour) -> np.ndarray | None:
  """(x1, y1, x2, y2) of the pixels of `colour` (after resampling: that channel above half, the
  others below), or None."""
  c = np.asarray(colour) > 0
  mask = ((image[..., c] > 127).all(-1)) & ((image[..., ~c] < 128).all(-1))
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return None
  return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _preprocess(ex, draw, flip=False, canvas=(128, 128), min_visible=0.0, max_boxes=5):
  return preprocess(ex, data_config(64, 128, 128, max_boxes, crop_min_visible=min_visible),
                    flip=flip, canvas=canvas, draw=draw)


def _oracle(boxes, h, w, draw, flip, canvas):
  """Plain numpy: quarter turns, scale, crop window, flips, applied to box corners."""
  b = boxes.astype(np.float64).copy()
  for _ in range(draw.rot90):  # Counterclockwise: (x, y) -> (y, w - x).
    b = np.stack([b[:, 1], w - b[:, 2], b[:, 3], w - b[:, 0]], 1)
    h, w = w, h
  scale = min(draw.min_size / min(h, w), 128 / max(h, w)) * draw.jitter
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  ch, cw = min(nh, canvas[0]), min(nw, canvas[1])
  y0 = min(int(draw.crop[0] * (nh - ch + 1)), nh - ch)
  x0 = min(int(draw.crop[1] * (nw - cw + 1)), nw - cw)
  b = np.clip(b * scale - [x0, y0, x0, y0], 0, [cw, ch, cw, ch])
  if flip:
    b = np.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], 1)
  if draw.vflip:
    b = np.stack([b[:, 0], ch - b[:, 3], b[:, 2], ch - b[:, 1]], 1)
  return b, (ch, cw), scale


GEOMETRIC = {
    'identity': (IDENTITY, False),
    'hflip': (IDENTITY, True),
    'vflip': (dataclasses.replace(IDENTITY, vflip=True), False),
    'rot90': (dataclasses.replace(IDENTITY, rot90=1), False),
    'rot180_hflip': (dataclasses.replace(IDENTITY, rot90=2), True),
    'rot270_vflip': (dataclasses.replace(IDENTITY, rot90=3, vflip=True), False),
    'multiscale': (dataclasses.replace(IDENTITY, min_size=40), False),
    'shrink': (dataclasses.replace(IDENTITY, jitter=0.5), True),
    'enlarge_crop': (dataclasses.replace(IDENTITY, jitter=1.9, crop=(0.7, 0.3)), False),
    'enlarge_crop_corner': (dataclasses.replace(IDENTITY, jitter=2.0, crop=(0.99, 0.99),
                                                rot90=1, vflip=True), True),
}


@pytest.mark.parametrize('name', list(GEOMETRIC))
def test_painted_boxes_land_where_the_transformed_boxes_say(name):
  draw, flip = GEOMETRIC[name]
  ex = _painted()
  canvas = (96, 128)
  if draw.rot90 % 2:
    canvas = (128, 128)
  row = _preprocess(ex, draw, flip, canvas)
  want, (ch, cw), scale = _oracle(ex['boxes'], 60, 80, draw, flip, canvas)
  np.testing.assert_array_equal(row['image_hw'], [ch, cw])
  np.testing.assert_allclose(row['scale'], [scale, scale], rtol=1e-6)  # (sy, sx).
  np.testing.assert_array_equal(row['orig_hw'], [60, 80])
  assert not row['image'][ch:].any() and not row['image'][:, cw:].any()
  kept = row['labels'][row['box_valid']]
  for label, colour in enumerate(COLOURS):
    found = _found(row['image'][:ch, :cw], colour)
    inside = (want[label, 2] - want[label, 0] >= 2) and (want[label, 3] - want[label, 1] >= 2)
    if label not in kept:
      assert not inside or found is None, (name, label)
      continue
    got = row['boxes'][row['box_valid']][list(kept).index(label)]
    np.testing.assert_allclose(got, want[label], atol=1e-3, err_msg=name)
    assert found is not None, (name, label)
    np.testing.assert_allclose(found, got, atol=1.0, err_msg=f'{name}: pixels vs box {label}')


def test_no_augmentation_draw_is_the_evaluation_resize():
  ex = _painted()
  plain = preprocess(ex, data_config(64, 128, 128, 5), flip=True)
  drawn = _preprocess(ex, IDENTITY, flip=True)
  for k in plain:
    np.testing.assert_array_equal(plain[k], drawn[k], err_msg=k)


def test_crops_keep_only_valid_boxes_and_count_what_they_drop():
  rng = np.random.default_rng(0)
  cfg = config_lib.get_base_config().data
  cfg.min_size = cfg.max_size = cfg.image_size = 128
  cfg.scale_jitter, cfg.random_vflip, cfg.random_rot90 = (0.1, 2.0), True, True
  cfg.crop_min_visible = 0.3
  for position in range(60):
    h, w = rng.integers(40, 200, 2)
    xy = rng.uniform(0, [w - 1, h - 1], (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (12, 2))], 1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)  # As sources give them.
    crowd = rng.random(12) < 0.3
    ex = {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'boxes': boxes,
          'labels': np.arange(12, dtype=np.int32), 'is_crowd': crowd, 'image_id': position}
    draw = augment.draw(cfg, 0, position)
    row = preprocess(ex, data_config(128, 128, 128, 12, crop_min_visible=0.3),
                     flip=position % 2 == 1, draw=draw)
    ch, cw = row['image_hw']
    b = row['boxes'][row['box_valid']]
    assert (b >= 0).all() and (b[:, [0, 2]] <= cw).all() and (b[:, [1, 3]] <= ch).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all(), position
    assert row['box_valid'].sum() + row['cropped_out'] == 12
    # Each object kept has >= 30% of its scaled area inside; each dropped one has less.
    sy, sx = row['scale']
    scaled = augment.rot90(ex['image'], boxes, draw.rot90)[1] * [sx, sy, sx, sy]
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    kept_labels = row['labels'][row['box_valid']]
    kept_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    objects = ~row['is_crowd'][row['box_valid']]
    assert (kept_area[objects] >= 0.3 * area[kept_labels[objects]] * (1 - 1e-5)).all()


def test_crop_boxes_share_rule_and_crowd_regions():
  boxes = np.asarray([[-10, 0, 10, 10],    # Half inside.
                      [-10, 0, 2, 10],     # 1/6 inside.
                      [-30, 0, 2, 10],     # Crowd, 1/16 inside: kept, clipped.
                      [-30, 0, -5, 10],    # Crowd, outside: dropped.
                      [5, 5, 15, 15]], np.float32)
  crowd = np.asarray([False, False, True, True, False])
  window = (0, 0, 20, 20)  # (y0, x0, h, w)
  clipped, keep = augment.crop_boxes(boxes, crowd, window, 0.4)
  np.testing.assert_array_equal(keep, [True, False, True, False, True])
  np.testing.assert_array_equal(clipped[[0, 2, 4]], [[0, 0, 10, 10], [0, 0, 2, 10], [5, 5, 15, 15]])
  _, keep = augment.crop_boxes(boxes, crowd, window, 0.6)
  np.testing.assert_array_equal(keep, [False, False, True, False, True])
  clipped, keep = augment.crop_boxes(boxes, crowd, (5, 5, 10, 10), 0.0)
  np.testing.assert_array_equal(keep, [True, False, False, False, True])
  np.testing.assert_array_equal(clipped[4], [0, 0, 10, 10])


def test_photometric_matches_numpy_oracles():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  x = image.astype(np.float64)
  grey = x @ [0.299, 0.587, 0.114]

  def run(**kw):
    return augment.photometric(image, dataclasses.replace(IDENTITY, **kw)).astype(np.float64)

  np.testing.assert_allclose(run(brightness=1.3), np.clip(x * 1.3, 0, 255), atol=1)
  mean = np.round(grey.mean())
  np.testing.assert_allclose(run(contrast=0.6), np.clip(mean + 0.6 * (x - mean), 0, 255), atol=1.5)
  np.testing.assert_allclose(run(saturation=0.5),
                             np.clip(grey[..., None] + 0.5 * (x - grey[..., None]), 0, 255),
                             atol=1.5)
  import torchvision.transforms.functional as tvf  # The meaning we follow.
  for hue in (0.1, -0.05):
    np.testing.assert_array_equal(run(hue=hue),
                                  np.asarray(tvf.adjust_hue(Image.fromarray(image), hue)))
  np.testing.assert_array_equal(run(), x)
  # Photometric changes pixels only: the boxes, image_hw and padding stay.
  ex = _painted()
  plain, drawn = _preprocess(ex, IDENTITY), _preprocess(ex, dataclasses.replace(
      IDENTITY, brightness=0.7, contrast=1.2, saturation=0.8, hue=-0.05))
  for k in plain:
    if k != 'image':
      np.testing.assert_array_equal(plain[k], drawn[k], err_msg=k)
  h, w = plain['image_hw']
  assert not drawn['image'][h:].any() and not drawn['image'][:, w:].any()
  assert not np.array_equal(plain['image'], drawn['image'])


def _aug_config(**overrides):
  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size = 128, 192, 128
  cfg.update(overrides)
  return cfg


def test_draws_are_a_pure_function_of_seed_and_position_and_cover_their_ranges():
  cfg = _aug_config(train_min_sizes=(96, 112, 128), scale_jitter=(0.1, 2.0), random_vflip=True,
                    random_rot90=True, brightness=0.2, contrast=0.3, saturation=0.4, hue=0.05)
  draws = [augment.draw(cfg, 3, p) for p in range(400)]
  assert draws == [augment.draw(cfg, 3, p) for p in range(400)]
  assert draws != [augment.draw(cfg, 4, p) for p in range(400)]
  assert {d.min_size for d in draws} == {96, 112, 128}
  assert {d.rot90 for d in draws} == {0, 1, 2, 3}
  assert 0.1 <= min(d.jitter for d in draws) < 0.2 and 1.9 < max(d.jitter for d in draws) <= 2.0
  assert 0.3 < np.mean([d.vflip for d in draws]) < 0.7
  for name, x in (('brightness', 0.2), ('contrast', 0.3), ('saturation', 0.4)):
    values = [getattr(d, name) for d in draws]
    assert 1 - x <= min(values) < 1 - 0.8 * x and 1 + 0.8 * x < max(values) <= 1 + x
  assert -0.05 <= min(d.hue for d in draws) < -0.04 and 0.04 < max(d.hue for d in draws) <= 0.05
  ranged = _aug_config(train_min_sizes=(100, 104), train_min_size_sampling='range')
  assert {augment.draw(ranged, 0, p).min_size for p in range(100)} == set(range(100, 105))
  # Turning one augmentation on leaves the others' draws alone.
  only_jitter = _aug_config(scale_jitter=(0.1, 2.0))
  assert [augment.draw(only_jitter, 3, p).jitter for p in range(50)] == [
      d.jitter for d in draws[:50]]
  assert not augment.enabled(_aug_config())
  assert augment.enabled(only_jitter)


@pytest.mark.parametrize('field, value', [
    ('train_min_sizes', (0, 100)), ('scale_jitter', (2.0, 1.0)), ('scale_jitter', (0.0, 1.0)),
    ('crop_min_visible', 1.5), ('brightness', 1.0), ('hue', 0.6),
    ('train_min_size_sampling', 'uniform')])
def test_bad_augmentation_fields_name_themselves(field, value):
  cfg = _aug_config(**{field: value})
  with pytest.raises(ValueError, match=field):
    augment.validate(cfg)
  with pytest.raises(ValueError, match='range'):
    augment.validate(_aug_config(train_min_sizes=(1, 2, 3), train_min_size_sampling='range'))
