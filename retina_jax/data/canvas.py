"""Canvases: the (height, width) each resized image is padded into, for training
(config.data.train_buckets) and evaluation (config.data.eval_buckets).

Every canvas side is a multiple of 32, the stride of C5: the square bucket's by
`retina_jax.sizes.check_canvases`, the others rounded up. Batches hold images of one canvas, so
the detector compiles once per canvas.
"""

from collections.abc import Sequence

import numpy as np

from retina_jax.data import resize

BUCKETS = ('orientation', 'square', 'torchvision')


def canvas_for(data_config, h: int, w: int, buckets: str, min_size: int | None = None
               ) -> tuple[int, int]:
  """(height, width) of the canvas an original h x w image is padded into, for `buckets`:
    'square': S x S, S = config.data.image_size.
    'orientation': the smallest canvases the resize rule can fill, one for landscape (w >= h)
      and one for portrait images: resized sides are at most min(min_size, max_size, S) and
      min(max_size, S), rounded up to multiples of 32. COCO's 800 / 1333 in a 1408 bucket gives
      800 x 1344 and 1344 x 800 (torchvision's own canvas for a 800 x 1333 image): 46% fewer
      pixels than 1408 x 1408. The resize is the same either way; only the padding differs.
    'torchvision': the image's own resized sides rounded up to multiples of 32, as torchvision
      pads an image run alone (a torchvision batch pads to the largest of these). Exact
      torchvision outputs need it (wider padding changes the features near the border and the
      P6/P7 strides of stride_rule='image_over_grid'), at one compilation per canvas. For
      800 / 1333 a canvas has a side of 800 with the other in 800..1344 (35 canvases), or a
      side of 1344 (the cap) with the other in 32..768 (48 more): at most 83, whatever the
      data set, each compiled once and kept by the detector's jit cache.
  min_size: the shorter side to hold instead of config.data.min_size (multi-scale training
  holds its largest).
  """
  s = int(data_config.image_size)
  min_side = int(data_config.min_size if min_size is None else min_size)
  if buckets == 'square':
    return s, s
  if buckets == 'torchvision':
    (nh, nw), _ = resize.resize_geometry(h, w, min_side, int(data_config.max_size), s,
                                         data_config.resize)
    return resize.ceil_multiple(nh), resize.ceil_multiple(nw)
  if buckets != 'orientation':
    raise ValueError(f'config.data.train_buckets / eval_buckets must be one of {BUCKETS}, '
                     f'got {buckets!r}.')
  long_side = min(int(data_config.max_size), s)
  short_side = min(min_side, long_side)
  short_side, long_side = resize.ceil_multiple(short_side), resize.ceil_multiple(long_side)
  return (short_side, long_side) if w >= h else (long_side, short_side)


def train_canvases(data_config, original_hw: Sequence[tuple[int, int]] | None, buckets: str,
                   min_size: int) -> tuple[list[tuple[int, int]], np.ndarray | None]:
  """The training canvases of images of sizes original_hw (int [n, 2]; None: unknown, which only
  'square' allows), holding shorter sides up to min_size -> (the distinct canvases in order of
  first appearance, each image's index into them int8 [n]; None when there is one canvas)."""
  if buckets == 'square':
    canvases = [canvas_for(data_config, 1, 1, buckets)]
  else:
    canvases = [canvas_for(data_config, int(h), int(w), buckets, min_size)
                for h, w in original_hw]
  distinct = list(dict.fromkeys(canvases))
  if data_config.get('random_rot90', False) and any(h != w for h, w in distinct):
    raise ValueError(f'config.data.random_rot90 turns landscape images into portrait ones, '
                     f'which the training canvases {distinct} cannot hold: set '
                     "config.data.train_buckets='square'.")
  if len(distinct) == 1:
    return distinct, None
  return distinct, np.asarray([distinct.index(c) for c in canvases], np.int8)


def eval_canvas(data_config, h: int, w: int) -> tuple[int, int]:
  """The canvas of an image in evaluation and `predict` (config.data.eval_buckets)."""
  return canvas_for(data_config, h, w, data_config.get('eval_buckets', 'orientation'))


def eval_canvases(data_config) -> dict[str, tuple[int, int]]:
  """Every canvas `eval_canvas` pads into, by the images it takes: {'landscape': (Hc, Wc) for
  width >= height, 'portrait': ...} under 'orientation', {'any': (S, S)} under 'square', and
  {} under 'torchvision', whose canvas follows each image's size (no fixed set)."""
  buckets = data_config.get('eval_buckets', 'orientation')
  if buckets == 'orientation':
    return {'landscape': canvas_for(data_config, 1, 1, buckets),
            'portrait': canvas_for(data_config, 2, 1, buckets)}
  if buckets == 'square':
    return {'any': canvas_for(data_config, 1, 1, buckets)}
  if buckets not in BUCKETS:
    raise ValueError(f'config.data.eval_buckets must be one of {BUCKETS}, got {buckets!r}.')
  return {}
