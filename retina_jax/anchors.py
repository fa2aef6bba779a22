"""Anchor boxes for levels P{min_level}..P{max_level}, computed once in numpy on the host.

For a fixed padded image size the anchors are a constant, so they are built here with numpy and
enter jitted code as a constant array. Layout (config.py): levels concatenated in order; within a
level row-major over (y, x) locations; then the A anchors of a location in `anchors_cfg.order`.

Per level l (base size `sizes[l - min_level]`), for aspect ratio r (height / width) and scale s,
the anchor has side lengths w = S / sqrt(r), h = S * sqrt(r) with S = size * s (area S**2, the
paper's definition), centred at ((x + offset) * stride, (y + offset) * stride).

Image sides must be multiples of 32 (the stride of C5, so that the FPN's top-down 2x steps are
exact). Level l then has a ceil(H / 2**l) x ceil(W / 2**l) grid: what stride-2 convs with
padding 1 produce for P6 and P7 when the side is not a multiple of 64 or 128 (800 -> 13 -> 7).
The stride of a level is 2**l (`stride_rule='nominal'`, detectron2 and the TF TPU models) or,
torchvision's rule, padded side // grid side per axis (`'image_over_grid'`: 800 // 7 = 114 on P7;
the same as 2**l when the side is a multiple of 2**max_level).
torchvision's generator is reproduced exactly with offset 0, truncate_sizes (S = int(size * s)),
round_base (corners of the zero-centred anchors rounded to integers) and 'image_over_grid'.
"""

import numpy as np

_ORDERS = ('ratio_major', 'scale_major')
_STRIDE_RULES = ('nominal', 'image_over_grid')
# The coarsest backbone feature is C5; image sides must be multiples of its stride.
SIZE_MULTIPLE = 32


def num_anchors_per_location(anchors_cfg) -> int:
  """A = number of scales x number of aspect ratios."""
  return len(anchors_cfg.scales) * len(anchors_cfg.aspect_ratios)


def _check(anchors_cfg, min_level, max_level, image_hw):
  num_levels = max_level - min_level + 1
  if num_levels < 1:
    raise ValueError(f'max_level ({max_level}) must be >= min_level ({min_level}).')
  if len(anchors_cfg.sizes) != num_levels:
    raise ValueError(
        f'anchors.sizes has {len(anchors_cfg.sizes)} entries, but levels P{min_level}..'
        f'P{max_level} need one base size each ({num_levels}).')
  if anchors_cfg.order not in _ORDERS:
    raise ValueError(f'anchors.order must be one of {_ORDERS}, got {anchors_cfg.order!r}.')
  if anchors_cfg.get('stride_rule', 'nominal') not in _STRIDE_RULES:
    raise ValueError(f'anchors.stride_rule must be one of {_STRIDE_RULES}, got '
                     f'{anchors_cfg.stride_rule!r}.')
  h, w = (int(v) for v in image_hw)
  if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
    raise ValueError(
        f'Image size {h}x{w} (height x width) must be a positive multiple of {SIZE_MULTIPLE} '
        f'(the stride of C5) on both sides; pad the image (config.data.image_size) to a '
        f'multiple of {SIZE_MULTIPLE}.')
  return h, w


def grid_sizes(min_level, max_level, image_hw) -> tuple[tuple[int, int], ...]:
  """(height, width) of the feature map of each level: ceil(side / 2**l), as the convs give."""
  h, w = (int(v) for v in image_hw)
  return tuple((-(-h // 2 ** l), -(-w // 2 ** l)) for l in range(min_level, max_level + 1))


def anchors_per_level(anchors_cfg, min_level, max_level, image_hw) -> tuple[int, ...]:
  """Number of anchors of each level P{min_level}..P{max_level}: grid height x width x A."""
  hw = _check(anchors_cfg, min_level, max_level, image_hw)
  a = num_anchors_per_location(anchors_cfg)
  return tuple(gh * gw * a for gh, gw in grid_sizes(min_level, max_level, hw))


def _cell_anchors(anchors_cfg, size):
  """Zero-centred anchors of one location: [A, 4] float32 (x1, y1, x2, y2), in `order`.

  float32 arithmetic in torchvision's order of operations, so that with truncate_sizes and
  round_base the result is bit-identical to AnchorGenerator.generate_anchors.
  """
  if anchors_cfg.truncate_sizes:
    sides = [float(int(size * s)) for s in anchors_cfg.scales]
  else:
    sides = [size * s for s in anchors_cfg.scales]
  sides = np.asarray(sides, np.float32)
  h_ratios = np.sqrt(np.asarray(anchors_cfg.aspect_ratios, np.float32))
  w_ratios = np.float32(1.0) / h_ratios
  if anchors_cfg.order == 'ratio_major':
    ws = (w_ratios[:, None] * sides[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sides[None, :]).reshape(-1)
  else:
    ws = (sides[:, None] * w_ratios[None, :]).reshape(-1)
    hs = (sides[:, None] * h_ratios[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
  if anchors_cfg.round_base:
    base = np.round(base)  # Half to even, like torch.round.
  return base.astype(np.float32)


def generate_anchors(anchors_cfg, min_level, max_level, image_hw) -> np.ndarray:
  """All anchors of a padded image.

  Args:
    anchors_cfg: config.anchors (sizes, scales, aspect_ratios, offset, truncate_sizes,
      round_base, order).
    min_level, max_level: pyramid levels, e.g. 3 and 7.
    image_hw: (height, width) of the padded image, both multiples of 32.

  Returns:
    [N, 4] float32 (x1, y1, x2, y2) pixels of the padded image, N = sum(anchors_per_level(...)).
  """
  h, w = _check(anchors_cfg, min_level, max_level, image_hw)
  image_over_grid = anchors_cfg.get('stride_rule', 'nominal') == 'image_over_grid'
  out = []
  grids = grid_sizes(min_level, max_level, (h, w))
  for i, (level, (gh, gw)) in enumerate(zip(range(min_level, max_level + 1), grids)):
    stride_y, stride_x = (h // gh, w // gw) if image_over_grid else (2 ** level, 2 ** level)
    base = _cell_anchors(anchors_cfg, float(anchors_cfg.sizes[i]))  # [A, 4]
    # Centres exactly representable in float32 (integers, or halves with offset 0.5).
    xs = (np.arange(gw, dtype=np.float32) + np.float32(anchors_cfg.offset)) * stride_x
    ys = (np.arange(gh, dtype=np.float32) + np.float32(anchors_cfg.offset)) * stride_y
    cy, cx = np.meshgrid(ys, xs, indexing='ij')
    cx = cx.reshape(-1)
    cy = cy.reshape(-1)
    shifts = np.stack([cx, cy, cx, cy], axis=1).astype(np.float32)  # [H_l * W_l, 4]
    out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
  return np.concatenate(out, axis=0).astype(np.float32)
