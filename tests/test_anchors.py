import math

import numpy as np
import pytest
import torch
from torchvision.models.detection import anchor_utils
from torchvision.models.detection import image_list

from retina_jax import anchors as anchors_lib
from retina_jax import config as config_lib


def _cfg(**overrides):
  cfg = config_lib.get_base_config().anchors
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


TORCHVISION = dict(offset=0.0, truncate_sizes=True, round_base=True, order='ratio_major',
                   stride_rule='image_over_grid')


# 256x384 tiles P7; 800x1344 (COCO) and 288x416 give P6/P7 grids of ceil(side / stride), where
# torchvision's strides (side // grid) are not 2**l.
@pytest.mark.parametrize('hw', [(256, 384), (288, 416), (800, 1344)])
def test_equals_torchvision_anchor_generator(hw):
  h, w = hw
  cfg = _cfg(**TORCHVISION)
  ours = anchors_lib.generate_anchors(cfg, 3, 7, (h, w))
  # torchvision's RetinaNet anchor generator (retinanet._default_anchorgen).
  sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
  gen = anchor_utils.AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
  images = image_list.ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  feats = [torch.zeros(1, 1, *g) for g in anchors_lib.grid_sizes(3, 7, (h, w))]
  theirs = gen(images, feats)[0].numpy()
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  np.testing.assert_array_equal(ours, theirs)


def test_grid_sizes_are_what_the_stride_two_convs_give():
  # 800 -> 100, 50, 25, 13, 7 rows: conv(k=3, s=2, p=1) maps n to (n - 1) // 2 + 1.
  assert anchors_lib.grid_sizes(3, 7, (800, 1344)) == (
      (100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
  n = 800 // 32
  assert (n - 1) // 2 + 1 == 13 and (13 - 1) // 2 + 1 == 7


def test_stride_rules_agree_on_multiples_of_128_and_differ_otherwise():
  nominal, tv = _cfg(), _cfg(stride_rule='image_over_grid')
  np.testing.assert_array_equal(anchors_lib.generate_anchors(nominal, 3, 7, (256, 384)),
                                anchors_lib.generate_anchors(tv, 3, 7, (256, 384)))
  a = anchors_lib.generate_anchors(nominal, 3, 7, (800, 1344))
  b = anchors_lib.generate_anchors(tv, 3, 7, (800, 1344))
  p3 = anchors_lib.anchors_per_level(nominal, 3, 7, (800, 1344))[0]
  np.testing.assert_array_equal(a[:p3], b[:p3])  # P3 (stride 8 both ways) is the same...
  assert not np.array_equal(a[-99:], b[-99:])  # ...P7 is not (stride 128 vs 800 // 7 = 114).
  with pytest.raises(ValueError, match='stride_rule'):
    anchors_lib.generate_anchors(_cfg(stride_rule='dense'), 3, 7, (256, 256))


def _paper_anchors(min_level, max_level, hw, sizes, scales, ratios, offset, order):
  """Written from the paper: area (size * scale)^2, h / w = ratio, centred on (i + offset) * stride."""
  out = []
  for i, level in enumerate(range(min_level, max_level + 1)):
    stride = 2 ** level
    shapes = []
    for r in ratios:
      for s in scales:
        side = sizes[i] * s
        shapes.append((r, s, side / math.sqrt(r), side * math.sqrt(r)))
    if order == 'scale_major':
      shapes.sort(key=lambda t: (scales.index(t[1]), ratios.index(t[0])))
    for y in range(-(-hw[0] // stride)):  # ceil: P6 / P7 of a side that is not a multiple.
      for x in range(-(-hw[1] // stride)):
        cx, cy = (x + offset) * stride, (y + offset) * stride
        for _, _, bw, bh in shapes:
          out.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
  return np.array(out)


@pytest.mark.parametrize('order,hw', [('ratio_major', (256, 128)), ('scale_major', (256, 128)),
                                      ('ratio_major', (160, 96))])
def test_default_settings_match_paper_oracle(order, hw):
  cfg = _cfg(order=order)
  ours = anchors_lib.generate_anchors(cfg, 3, 7, hw)
  ref = _paper_anchors(3, 7, hw, cfg.sizes, cfg.scales, cfg.aspect_ratios, cfg.offset, order)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # First anchor of P3: centred at (4, 4), ratio 0.5 (wide), area 32^2.
  w, h = ours[0, 2] - ours[0, 0], ours[0, 3] - ours[0, 1]
  np.testing.assert_allclose([(ours[0, 0] + ours[0, 2]) / 2, h / w, w * h], [4, 0.5, 1024], rtol=1e-5)


def test_ratio_major_and_scale_major_differ_in_the_way_documented():
  a = anchors_lib.num_anchors_per_location(_cfg())
  first = {}
  for order in ('ratio_major', 'scale_major'):
    anchors = anchors_lib.generate_anchors(_cfg(order=order), 3, 7, (128, 128))[:a]
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    first[order] = (np.round(h / w, 3), np.round(np.sqrt(w * h), 2))
  ratios, sides = first['ratio_major']
  # Ratio outer, scale inner: ratios constant over the first 3 anchors, sides growing.
  np.testing.assert_allclose(ratios, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-2)
  np.testing.assert_allclose(sides, np.tile(32 * 2 ** (np.arange(3) / 3), 3), rtol=1e-3)
  ratios, sides = first['scale_major']
  np.testing.assert_allclose(ratios, np.tile([0.5, 1.0, 2.0], 3), rtol=1e-2)
  np.testing.assert_allclose(sides, np.repeat(32 * 2 ** (np.arange(3) / 3), 3), rtol=1e-3)


def test_anchors_per_level_counts_and_layout():
  cfg = _cfg()
  hw = (256, 384)
  sizes = anchors_lib.anchors_per_level(cfg, 3, 7, hw)
  assert sizes == tuple((256 >> l) * (384 >> l) * 9 for l in range(3, 8))
  anchors = anchors_lib.generate_anchors(cfg, 3, 7, hw)
  assert anchors.shape == (sum(sizes), 4)
  # Row-major over (y, x): the second location of P3 is one stride to the right.
  np.testing.assert_allclose(anchors[9:18] - anchors[:9], [[8, 0, 8, 0]] * 9, atol=1e-5)
  # Row 1 of P3 starts after 384 / 8 locations, one stride down.
  np.testing.assert_allclose(anchors[48 * 9] - anchors[0], [0, 8, 0, 8], atol=1e-5)
  # P4 starts right after P3 with the 64 px base size.
  p4 = anchors[sizes[0]:sizes[0] + 9]
  np.testing.assert_allclose(np.sqrt((p4[:, 2] - p4[:, 0]) * (p4[:, 3] - p4[:, 1]))[:3],
                             64 * 2 ** (np.arange(3) / 3), rtol=1e-5)


def test_num_anchors_per_location():
  assert anchors_lib.num_anchors_per_location(_cfg()) == 9
  assert anchors_lib.num_anchors_per_location(_cfg(scales=(1.0, 2.0), aspect_ratios=(1.0,))) == 2


def test_rejects_sizes_that_are_not_multiples_of_32():
  with pytest.raises(ValueError, match='multiple of 32'):
    anchors_lib.generate_anchors(_cfg(), 3, 7, (200, 384))
  with pytest.raises(ValueError, match='multiple'):
    anchors_lib.anchors_per_level(_cfg(), 3, 7, (256, 100))
  with pytest.raises(ValueError, match='sizes has 5 entries'):
    anchors_lib.generate_anchors(_cfg(), 3, 6, (256, 256))
