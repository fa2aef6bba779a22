"""One input pipeline for every source: decode, resize, flip, pad into a fixed bucket, batch.

Host batch (numpy; this host's rows of the global batch; the lead's sharding code assembles the
global jax.Array):
  'image'         uint8   [B, S, S, 3] RGB, the resized image at the top left, 0 elsewhere
                          (float32 under config.data.resize='torchvision': `image_dtype`)
                          (evaluation: [B, Hc, Wc, 3], one canvas per batch, `eval_canvas`)
  'image_hw'      int32   [B, 2] (h, w) of the valid resized region
  'boxes'         float32 [B, G, 4] (x1, y1, x2, y2) in resized pixels (0 where padded)
  'labels'        int32   [B, G] contiguous labels (0 where padded)
  'is_crowd'      bool    [B, G]
  'box_valid'     bool    [B, G]
  'image_id'      int64   [B] the data set's image id (-1 on eval padding); host-side only,
                          int64 because data sets use ids past 2**31 (never sent to devices,
                          where jax would truncate it to int32)
  'orig_hw'       int32   [B, 2] (h, w) of the original image
  'scale'         float32 [B, 2] (sy, sx): box coordinates resized = original * s per axis
                          (config.data.resize: `resize_geometry`)
  'example_valid' bool    [B] False on eval padding (and on skipped unreadable images)
  'cropped_out'   int32   [B] objects and crowd regions a training crop dropped (host-side)
S = config.data.image_size, G = config.data.max_boxes. Normalisation happens on device
(`normalize_images`), so the host ships 1 byte per channel (4 under resize='torchvision').

Resume design: where the training data stands is a pure function of (seed, step), never of
iterator state. Global example position p = step * global_batch + row; epoch e = p // N (N
examples), and the example is `permutation(seed, e)[p % N]`, the permutation drawn from
numpy's PCG64 seeded with (seed, 0, e); its horizontal flip is drawn from (seed, 1, p), any
other augmentation (`retina_jax.data.augment`) from (seed, 2, p). Epochs run into each other
without dropping a remainder, so every example is seen once per epoch. A run resumed at step s
calls `TrainLoader.iterate(s)` (or `batch(s)`) and gets exactly the batches an uninterrupted run
would have got: nothing repeated, nothing skipped, whatever the number of workers, prefetch depth
or restarts. The global batch is also the same for any number of hosts:
process i takes rows [i * B, (i + 1) * B) of it, B = global batch / process count.
"""

import concurrent.futures
import functools
import itertools
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from retina_jax import anchors as anchors_lib
from retina_jax.data import augment, shapes
from retina_jax.data.coco_format import BadImageError, CocoFormatSource
from retina_jax.data.tfds_source import TfdsSource

Source = CocoFormatSource | TfdsSource


def create_source(data_config, split: str) -> Source:
  """The random-access source for config.data.name: shapes | coco_format | a tfds name."""
  skip = bool(data_config.get('skip_bad_images', False))
  if data_config.name == 'shapes':
    if split not in shapes.SPLITS:
      raise ValueError(f'The shapes data set has splits {shapes.SPLITS}, not {split!r}.')
    root = shapes.ensure_shapes(data_config.root, data_config.shapes_num_train,
                                data_config.shapes_num_eval, data_config.get('shapes_seed', 0))
    return CocoFormatSource(root, split, skip_bad_images=skip)
  if data_config.name == 'coco_format':
    if not data_config.root:
      raise ValueError('config.data.name=coco_format needs config.data.root: a directory with '
                       'annotations/instances_<split>.json and <split>/ images.')
    return CocoFormatSource(data_config.root, split, skip_bad_images=skip)
  return TfdsSource(data_config.name, split, data_config.tfds_data_dir)


def resize_scale(h: int, w: int, min_size: int, max_size: int, image_size: int) -> float:
  """Shorter side to min_size, unless the longer side would pass max_size or the bucket."""
  scale = min_size / min(h, w)
  return min(scale, max_size / max(h, w), image_size / max(h, w))


def resized_hw(h: int, w: int, scale: float, image_size: int) -> tuple[int, int]:
  """(h, w) of the resized image: each side round(side * scale), at least 1 pixel (a 3 x 1000
  image into a 128 bucket would otherwise be 0 pixels high) and at most the bucket."""
  return (min(image_size, max(1, round(h * scale))), min(image_size, max(1, round(w * scale))))


# config.data.resize -> what it does ('pil' is the default and ships 1/4 of the bytes; under
# 'torchvision' converted torchvision weights predict and train exactly as in torchvision).
RESIZE_RULES = {
    'pil': 'scale = min(min_size / shorter side, max_size / longer side, image_size / longer '
           'side); each side min(image_size, max(1, round(side * scale))); PIL bilinear on the '
           'uint8 image; boxes times scale; uint8 images',
    'torchvision': "torchvision's GeneralizedRCNNTransform: scale as for 'pil'; each side "
                   'max(1, int(side * scale)); bilinear interpolation of the float image '
                   '(F.interpolate with recompute_scale_factor=True, align_corners=False, no '
                   'antialias); boxes times the per-axis ratio resized / original; float32 '
                   'images (0..255, normalised on the device)',
}


def resize_geometry(h: int, w: int, min_size: int, max_size: int, image_size: int,
                    rule: str = 'pil') -> tuple[tuple[int, int], tuple[float, float]]:
  """The resize of an h x w image under `rule` (RESIZE_RULES), from its size alone.

  Returns ((nh, nw) resized sides, (sy, sx) float32): box coordinates map as resized =
  original * s per axis, and back as original = resized / s.
  """
  if rule == 'pil':
    scale = resize_scale(h, w, min_size, max_size, image_size)
    return resized_hw(h, w, scale, image_size), (np.float32(scale), np.float32(scale))
  if rule != 'torchvision':
    raise ValueError(f'config.data.resize must be one of {list(RESIZE_RULES)}, got {rule!r}.')
  # The scale in Python floats, as torchvision computes it (min(self_min_size / min_size, ...)),
  # and F.interpolate's output size int(side * scale_factor) in double precision; the bucket
  # term only binds when the bucket is smaller than max_size, where no rule can be torchvision's.
  scale = resize_scale(h, w, min_size, max_size, image_size)
  nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
  return (nh, nw), (np.float32(nh) / np.float32(h), np.float32(nw) / np.float32(w))


def _linear_taps(in_size: int, out_size: int):
  """ATen's bilinear taps along one axis (align_corners=False, the scale recomputed as
  in_size / out_size in float32): -> (i0, i1 int [out], w0, w1 float32 [out]).

  The source coordinate scale * (dst + 0.5) - 0.5 is rounded to float32 once, as ATen's fused
  multiply-add does (in float64 the product of two float32s is exact); rounding the product
  first moves weights by up to 3e-5 at 1000-pixel sides."""
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int64)
  w1 = np.minimum(src - i0.astype(np.float32), np.float32(1))
  return i0, np.minimum(i0 + 1, in_size - 1), np.float32(1) - w1, w1


@jax.jit
def _interpolate(image: jax.Array, taps) -> jax.Array:
  """uint8 [Hi, Wi, 3] (the original, zero-padded) -> float32 [Ho, Wo, 3]: width then height,
  each output pixel w0 * x[i0] + w1 * x[i1] with the (i0, i1, w0, w1) of `taps` (y, x)."""
  (yi0, yi1, yw0, yw1), (xi0, xi1, xw0, xw1) = taps
  x = image.astype(jnp.float32)
  x = x[:, xi0] * xw0[None, :, None] + x[:, xi1] * xw1[None, :, None]
  return x[yi0] * yw0[:, None, None] + x[yi1] * yw1[:, None, None]


def interpolate_torchvision(image: np.ndarray, hw: tuple[int, int], device) -> jax.Array:
  """torchvision's bilinear resize of uint8 [H, W, 3] to hw = (nh, nw), run by XLA on `device`
  -> float32 [ceil32(nh), ceil32(nw), 3], 0 past the resized sides.

  The original is padded to multiples of 64 and the output to multiples of 32 (taps of weight 0),
  so that one compilation serves every image of the same padded sizes (~0.3 s each on CPU).
  """
  h, w = image.shape[:2]
  padded = np.zeros((_ceil_multiple(h, 64), _ceil_multiple(w, 64), 3), np.uint8)
  padded[:h, :w] = image
  taps = tuple(tuple(np.pad(t, (0, _ceil_multiple(n) - n)) for t in _linear_taps(size, n))
               for size, n in ((h, hw[0]), (w, hw[1])))
  return _interpolate(jax.device_put(padded, device), jax.device_put(taps, device))


@functools.cache
def _host_cpu():
  """XLA's CPU device, where the host pipeline interpolates: 4x faster than numpy's gathers and
  faster than PIL on uint8 (benchmarks/resize_rules.py). The default device when the CPU
  backend is not enabled (JAX_PLATFORMS without cpu). Looked up on first use, not at import,
  so that jax.distributed.initialize can still run first."""
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return jax.local_devices()[0]


def resize_image(image: np.ndarray, hw: tuple[int, int], rule: str = 'pil') -> np.ndarray:
  """uint8 [H, W, 3] -> [nh, nw, 3] as `rule` resizes (see RESIZE_RULES): uint8 for 'pil',
  float32 (pixel values 0..255, not normalised) for 'torchvision'.

  'torchvision' interpolates width then height with ATen's taps and in its order of the
  products, so it equals F.interpolate of the normalised image after normalising (bilinear
  weights sum to 1) to float32 rounding.
  """
  nh, nw = hw
  if rule == 'pil':
    if (nh, nw) == image.shape[:2]:
      return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  return np.asarray(interpolate_torchvision(image, hw, _host_cpu()))[:nh, :nw]


def image_dtype(data_config) -> type:
  """dtype of the host batch's 'image': uint8, or float32 under config.data.resize='torchvision'
  (its interpolated pixels are not integers)."""
  return np.float32 if data_config.resize == 'torchvision' else np.uint8


BUCKETS = ('orientation', 'square', 'torchvision')


def _ceil_multiple(x: int, m: int = anchors_lib.SIZE_MULTIPLE) -> int:
  return -(-int(x) // m) * m


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
    (nh, nw), _ = resize_geometry(h, w, min_side, int(data_config.max_size), s,
                                  data_config.resize)
    return _ceil_multiple(nh), _ceil_multiple(nw)
  if buckets != 'orientation':
    raise ValueError(f'config.data.train_buckets / eval_buckets must be one of {BUCKETS}, '
                     f'got {buckets!r}.')
  long_side = min(int(data_config.max_size), s)
  short_side = min(min_side, long_side)
  short_side, long_side = _ceil_multiple(short_side), _ceil_multiple(long_side)
  return (short_side, long_side) if w >= h else (long_side, short_side)


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


def preprocess(example: dict, *, min_size: int, max_size: int, image_size: int, max_boxes: int,
               flip: bool, image_out: np.ndarray | None = None,
               canvas: tuple[int, int] | None = None, resize: str = 'pil',
               draw: augment.Draw | None = None, crop_min_visible: float = 0.0
               ) -> dict[str, Any]:
  """One source example -> one row of the host batch (see the module docstring for layouts).

  example: 'image' uint8 [H, W, 3]; 'boxes' float32 [n, 4] (x1, y1, x2, y2) original pixels;
  'labels' int32 [n]; 'is_crowd' bool [n]; 'image_id' int. Objects beyond max_boxes are dropped,
  crowd regions first (they only ever cause ignored anchors), then the last ones in file order.
  image_out: optional all-zero [Hc, Wc, 3] array of `image_dtype` to write the padded image
  into (a row of the batch array, which saves copying megabytes per image at 800 px).
  canvas: (Hc, Wc) of the padded image; (S, S) when None. Must hold the resized image, unless
  `draw` jitters the scale (then a larger image is cropped into it).
  resize: the resize rule, config.data.resize (RESIZE_RULES).
  draw: training augmentation (`augment.draw`), applied in this order: quarter turns of the
  original, the resize rule with draw.min_size and every size of the rule times draw.jitter,
  the crop (boxes that keep less than crop_min_visible of their area inside are dropped;
  'cropped_out' counts them), the flips, the photometric distortion. None (evaluation): the
  plain resize. Either way 'scale' is the applied resize (resized = original * s per axis,
  before any crop) and 'image_hw' the valid region.
  """
  image, boxes = example['image'], example['boxes'].astype(np.float32)
  labels, is_crowd = example['labels'], np.asarray(example['is_crowd'], bool)
  h, w = image.shape[:2]
  canvas = (image_size, image_size) if canvas is None else tuple(canvas)
  if draw is not None and draw.rot90:
    image, boxes = augment.rot90(image, boxes, draw.rot90)
  rh, rw = image.shape[:2]
  scale_jittered = draw is not None and draw.jitter != 1.0
  if draw is None:
    sizes = (min_size, max_size, image_size)
  else:  # Jitter scales every size of the rule; what passes the canvas is cropped away.
    sizes = tuple(s * draw.jitter for s in (draw.min_size, max_size, image_size))
  (nh, nw), (sy, sx) = resize_geometry(rh, rw, *sizes, resize)
  nh, nw = int(nh), int(nw)  # Jittered sizes are floats.
  y0, x0, ch, cw = (augment.crop_window((nh, nw), canvas, draw.crop) if scale_jittered
                    else (0, 0, nh, nw))
  if resize == 'pil' and (ch, cw) != (nh, nw) and (nh, nw) != (rh, rw):
    # Resizes only the window: the crop of the resized image, at the window's cost.
    image = np.asarray(Image.fromarray(image).resize(
        (cw, ch), Image.BILINEAR, box=(x0 * rw / nw, y0 * rh / nh, (x0 + cw) * rw / nw,
                                       (y0 + ch) * rh / nh)))
  else:
    image = resize_image(image, (nh, nw), resize)[y0:y0 + ch, x0:x0 + cw]
  boxes = boxes * np.asarray([sx, sy, sx, sy], np.float32)
  keep = np.ones(len(boxes), bool)
  if not scale_jittered:
    boxes = np.clip(boxes, 0, np.asarray([nw, nh, nw, nh], np.float32))  # Rounding of the sides.
  else:  # Also uncropped: at scale 0.1 the rounding of a side can swallow a whole box.
    boxes, keep = augment.crop_boxes(boxes, is_crowd, (y0, x0, ch, cw), crop_min_visible)
    boxes, labels, is_crowd = boxes[keep], labels[keep], is_crowd[keep]
  if flip:
    image = image[:, ::-1]
    boxes = augment.hflip_boxes(boxes, cw)
  if draw is not None and draw.vflip:
    image = image[::-1]
    boxes = augment.vflip_boxes(boxes, ch)
  if draw is not None and draw.photometric:
    image = augment.photometric(np.ascontiguousarray(image), draw)
  order = np.argsort(is_crowd, kind='stable')[:max_boxes]
  n = len(order)
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_boxes[:n] = boxes[order]
  out_labels = np.zeros((max_boxes,), np.int32)
  out_labels[:n] = labels[order]
  crowd = np.zeros((max_boxes,), bool)
  crowd[:n] = is_crowd[order]
  if ch > canvas[0] or cw > canvas[1]:
    raise ValueError(f'Image id {example["image_id"]}: resized to {ch}x{cw}, larger than the '
                     f'{canvas[0]}x{canvas[1]} canvas.')
  padded = np.zeros((*canvas, 3), image.dtype) if image_out is None else image_out
  padded[:ch, :cw] = image
  return {
      'image': padded, 'image_hw': np.asarray([ch, cw], np.int32), 'boxes': out_boxes,
      'labels': out_labels, 'is_crowd': crowd, 'box_valid': np.arange(max_boxes) < n,
      'image_id': np.int64(example['image_id']), 'orig_hw': np.asarray([h, w], np.int32),
      'scale': np.asarray([sy, sx], np.float32), 'example_valid': np.bool_(True),
      'cropped_out': np.int32((~keep).sum())}


def _blank_batch(batch_size: int, canvas: tuple[int, int], max_boxes: int,
                 dtype: type) -> dict[str, np.ndarray]:
  """Rows that carry nothing (eval padding, skipped images) until a row is written."""
  b, g = batch_size, max_boxes
  return {
      'image': np.zeros((b, *canvas, 3), dtype), 'image_hw': np.zeros((b, 2), np.int32),
      'boxes': np.zeros((b, g, 4), np.float32), 'labels': np.zeros((b, g), np.int32),
      'is_crowd': np.zeros((b, g), bool), 'box_valid': np.zeros((b, g), bool),
      'image_id': np.full((b,), -1, np.int64), 'orig_hw': np.zeros((b, 2), np.int32),
      'scale': np.ones((b, 2), np.float32), 'example_valid': np.zeros((b,), bool),
      'cropped_out': np.zeros((b,), np.int32)}



def _host_slice(global_batch_size: int, process_index: int | None,
                process_count: int | None) -> tuple[int, int]:
  """-> (first row of this host in the global batch, host-local batch size)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible by the '
                     f'{process_count} processes.')
  local = global_batch_size // process_count
  return process_index * local, local


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, 0, epoch)).permutation(n)


def _prefetch(make: Callable[[int], Any], steps: Iterator[int], depth: int) -> Iterator[Any]:
  """Yields make(step) for each step, computed `depth` steps ahead by a background thread.

  An exception in `make` is re-raised in the consumer at the step where it happened. Closing the
  generator (or dropping it) stops the thread.
  """
  q: queue.Queue = queue.Queue(maxsize=max(1, depth))
  stop = threading.Event()
  end = object()

  def put(item) -> bool:
    while not stop.is_set():  # Never block forever on a consumer that has gone away.
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    for step in steps:
      try:
        item = (True, make(step))
      except Exception as e:  # Handed over to the consumer, with its traceback.
        put((False, e))
        return
      if not put(item):
        return
    put((True, end))

  thread = threading.Thread(target=produce, daemon=True, name='retina_jax-prefetch')
  thread.start()
  try:
    while True:
      ok, item = q.get()
      if not ok:
        raise item
      if item is end:
        return
      yield item
  finally:
    stop.set()


class _Batcher:
  """Loads and preprocesses rows on a thread pool; shared by training and evaluation."""

  def __init__(self, source: Source, data_config):
    self.source = source
    self.image_size = int(data_config.image_size)
    if self.image_size % anchors_lib.SIZE_MULTIPLE:
      raise ValueError(f'config.data.image_size must be a multiple of {anchors_lib.SIZE_MULTIPLE} '
                       f'(the stride of C5), got {self.image_size}.')
    self.max_boxes = int(data_config.max_boxes)
    self.min_size, self.max_size = int(data_config.min_size), int(data_config.max_size)
    self.resize = data_config.resize
    self.image_dtype = image_dtype(data_config)
    self.skip_bad_images = bool(data_config.get('skip_bad_images', False))
    self.prefetch = int(data_config.get('prefetch_batches', 2))
    self.crop_min_visible = float(data_config.get('crop_min_visible', 0.0))
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, int(data_config.num_workers)), thread_name_prefix='retina_jax-decode')
    counts = source.object_counts
    if counts is not None and (counts > self.max_boxes).any():
      over = counts > self.max_boxes
      logging.warning('%d images have more than max_boxes=%d objects (at most %d); %d objects '
                      'will be dropped (crowd regions first).', int(over.sum()), self.max_boxes,
                      int(counts.max()), int((counts[over] - self.max_boxes).sum()))

  def _write_row(self, batch: dict[str, np.ndarray], r: int, index: int, flip: bool,
                 draw: augment.Draw | None):
    try:
      example = self.source[index]
    except BadImageError as e:
      if not self.skip_bad_images:
        e.add_note('Set config.data.skip_bad_images=True to go on without unreadable images.')
        raise
      logging.warning('Skipping (config.data.skip_bad_images): %s', e)
      batch['image_id'][r] = e.image_id  # The row stays blank, example_valid False.
      return
    if len(example['boxes']) > self.max_boxes and self.source.object_counts is None:
      logging.log_every_n(logging.WARNING, 'Image id %d has %d objects > max_boxes=%d; extra '
                          'ones dropped.', 100, example['image_id'], len(example['boxes']),
                          self.max_boxes)
    row = preprocess(example, min_size=self.min_size, max_size=self.max_size,
                     image_size=self.image_size, max_boxes=self.max_boxes, flip=flip,
                     image_out=batch['image'][r], canvas=batch['image'].shape[1:3],
                     resize=self.resize, draw=draw, crop_min_visible=self.crop_min_visible)
    for k, v in row.items():
      if k != 'image':
        batch[k][r] = v

  def rows(self, rows: Sequence[tuple[int, bool, augment.Draw | None] | None],
           canvas: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """rows: (source index, flip, augmentation draw) per batch row, None for padding -> the
    batch, every image padded to `canvas` (S x S when None)."""
    canvas = (self.image_size, self.image_size) if canvas is None else tuple(canvas)
    batch = _blank_batch(len(rows), canvas, self.max_boxes, self.image_dtype)
    jobs = [self._pool.submit(self._write_row, batch, r, int(row[0]), bool(row[1]), row[2])
            for r, row in enumerate(rows) if row is not None]
    for job in jobs:
      job.result()  # Re-raises a worker's exception.
    return batch


@functools.lru_cache(maxsize=8)
def _epoch_groups(seed: int, epoch: int, groups_key: bytes, num_groups: int
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
  """Epoch `epoch`'s stream of canvas groups: (running count of each group's members up to and
  including each position, int64 [N, G]; positions of each group's members, G arrays)."""
  groups = np.frombuffer(groups_key, np.int8)
  order = groups[_epoch_permutation(seed, epoch, len(groups))]
  counts = np.cumsum(order[:, None] == np.arange(num_groups)[None], axis=0)
  return counts, [np.flatnonzero(order == g) for g in range(num_groups)]


class TrainLoader:
  """Training batches as a pure function of (seed, step); see the module docstring.

  `batch(step)` builds this host's part of global batch `step` synchronously; `iterate(start)`
  yields batches start, start + 1, ... forever, built ahead by a background thread.

  Canvases (config.data.train_buckets): with 'square', or when every image gets the same canvas,
  global example position p = step * GB + row as in the module docstring. With 'orientation'
  and both landscape and portrait images, every global batch holds images of one canvas, as
  detectron2's aspect-ratio grouping does, still as a pure function of (seed, step): the epoch
  streams `permutation(seed, e)` run into each other as before; each canvas group takes its own
  members from that stream in order, GB at a time; and global batches come in the order in
  which they fill up (the position of their last member). Every image is seen once per pass of
  its group through the stream; flips are drawn from (seed, 1, stream position).
  """

  def __init__(self, source: Source, data_config, global_batch_size: int, seed: int, *,
               process_index: int | None = None, process_count: int | None = None):
    if len(source) == 0:
      raise ValueError('The training split has no images.')
    self._batcher = _Batcher(source, data_config)
    self.source = source
    self.seed = int(seed)
    self.random_flip = bool(data_config.random_flip)
    augment.validate(data_config)
    self._data_config = data_config if augment.enabled(data_config) else None
    self._cropped_out = 0  # Objects and crowd regions dropped by crops so far (for the log).
    self.global_batch_size = int(global_batch_size)
    self._first_row, self.local_batch_size = _host_slice(
        self.global_batch_size, process_index, process_count)
    buckets = data_config.get('train_buckets', 'square')
    hw = getattr(source, 'original_hw', None)
    if buckets != 'square' and hw is None:
      logging.info('config.data.train_buckets=%r needs the image sizes before decoding, which '
                   '%s does not list: training in the square bucket.', buckets,
                   type(source).__name__)
      buckets = 'square'
    largest = augment.largest_min_size(data_config)
    canvases = ([canvas_for(data_config, int(h), int(w), buckets, largest) for h, w in hw]
                if buckets != 'square' else [(self._batcher.image_size,) * 2])
    self.canvases = list(dict.fromkeys(canvases))
    if data_config.get('random_rot90', False) and any(h != w for h, w in self.canvases):
      raise ValueError(f'config.data.random_rot90 turns landscape images into portrait ones, '
                       f'which the training canvases {self.canvases} cannot hold: set '
                       "config.data.train_buckets='square'.")
    if len(self.canvases) > 1:
      self._groups = np.asarray([self.canvases.index(c) for c in canvases], np.int8)
      self._groups_key = self._groups.tobytes()  # Cache key of `_epoch_groups`.
      self._group_sizes = np.bincount(self._groups, minlength=len(self.canvases))
      logging.info('Training canvases %s with %s images.', self.canvases,
                   self._group_sizes.tolist())

  @property
  def steps_per_epoch(self) -> float:
    return len(self.source) / self.global_batch_size

  def _stream_position(self, step: int) -> tuple[int, int]:
    """Global batch `step` of the canvas groups -> (its group, index of its first member in
    the group's stream)."""
    n, gb, num_groups = len(self.source), self.global_batch_size, len(self.canvases)

    def group_counts(p):  # Members of each group at stream positions <= p.
      epoch, r = divmod(p, n)
      return epoch * self._group_sizes + _epoch_groups(self.seed, epoch, self._groups_key,
                                                       num_groups)[0][r]

    # The epoch in which the batch fills up: the first whose end has filled step + 1 batches
    # (a closed form: each group has passed through the stream epoch + 1 times by then).
    lo, hi = 0, -(-(step + 1 + num_groups) * gb // n)
    while lo < hi:
      mid = (lo + hi) // 2
      if int(((mid + 1) * self._group_sizes // gb).sum()) >= step + 1:
        hi = mid
      else:
        lo = mid + 1
    # Then the stream position within that epoch at which it fills up.
    lo, hi = lo * n, lo * n + n - 1
    while lo < hi:
      mid = (lo + hi) // 2
      if int((group_counts(mid) // gb).sum()) >= step + 1:
        hi = mid
      else:
        lo = mid + 1
    epoch, r = divmod(lo, n)
    group = int(self._groups[_epoch_permutation(self.seed, epoch, n)[r]])
    return group, (int(group_counts(lo)[group]) // gb - 1) * gb

  def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray, list, tuple[int, int]]:
    """-> (source indices int64 [B], flips bool [B], augmentation draws [B] (None when off),
    canvas) of this host's rows of global batch `step`, from one walk of the stream."""
    n = len(self.source)
    if len(self.canvases) == 1:
      canvas = self.canvases[0]
      positions = (step * self.global_batch_size + self._first_row
                   + np.arange(self.local_batch_size, dtype=np.int64))
    else:
      group, first = self._stream_position(step)
      canvas = self.canvases[group]
      size = int(self._group_sizes[group])
      positions = []
      for k in range(first + self._first_row, first + self._first_row + self.local_batch_size):
        epoch, j = divmod(k, size)  # The j-th member of `group` in epoch `epoch`.
        members = _epoch_groups(self.seed, epoch, self._groups_key, len(self.canvases))[1]
        positions.append(epoch * n + int(members[group][j]))
      positions = np.asarray(positions, np.int64)
    indices = np.asarray([_epoch_permutation(self.seed, int(p // n), n)[p % n]
                          for p in positions], np.int64)
    if self.random_flip:
      flips = np.asarray([np.random.default_rng((self.seed, 1, int(p))).random() < 0.5
                          for p in positions])
    else:
      flips = np.zeros(len(positions), bool)
    draws = [None if self._data_config is None else
             augment.draw(self._data_config, self.seed, int(p)) for p in positions]
    return indices, flips, draws, canvas

  def example_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (source indices int64 [B], flips bool [B]) of this host's rows of global batch `step`."""
    return self._rows(step)[:2]

  def canvas(self, step: int) -> tuple[int, int]:
    """(Hc, Wc) of global batch `step`."""
    if len(self.canvases) == 1:
      return self.canvases[0]
    return self.canvases[self._stream_position(step)[0]]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    indices, flips, draws, canvas = self._rows(step)
    batch = self._batcher.rows(list(zip(indices, flips, draws)), canvas)
    dropped = int(batch['cropped_out'].sum())
    if dropped:
      self._cropped_out += dropped
      logging.log_every_n_seconds(
          logging.INFO, 'Up to step %d, crops have dropped %d objects and crowd regions on this '
          'host (less than crop_min_visible=%g of their area inside).', 300, step,
          self._cropped_out, self._batcher.crop_min_visible)
    return batch

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return _prefetch(self.batch, itertools.count(start_step), self._batcher.prefetch)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return math.ceil(num_examples / global_batch_size)


def eval_plan(data_config, global_batch_size: int, image_hw: np.ndarray
              ) -> list[tuple[tuple[int, int], np.ndarray]]:
  """The global eval batches: [(canvas (Hc, Wc), source indices [<= GB])], every image once.

  image_hw: int [n, 2] (h, w) of the original images 0..n-1. Images are grouped by their
  `eval_canvas`, in source order within a canvas, canvases in order of first appearance; a
  canvas's last batch may be short (the rest of its rows are padding).
  """
  image_hw = np.asarray(image_hw).reshape(-1, 2)
  canvases = [eval_canvas(data_config, int(h), int(w)) for h, w in image_hw]
  plan = []
  for canvas in dict.fromkeys(canvases):
    members = np.asarray([i for i, c in enumerate(canvases) if c == canvas], np.int64)
    plan += [(canvas, members[k:k + global_batch_size])
             for k in range(0, len(members), global_batch_size)]
  return plan


def eval_batches(source: Source, data_config, global_batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 num_images: int = 0, image_hw: np.ndarray | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every image of the first `num_images` (0: all) exactly once across all hosts.

  Global batch b holds GB images that share one canvas (`eval_plan`: images grouped by
  `eval_canvas`, in source order within a group); host i takes its rows of it. Every host
  yields the same batches (collectives stay in step); rows past a group's end are padding with
  example_valid False and image_id -1. No flip; orig_hw, scale and image_id come along for
  mapping detections back to the original image.

  image_hw: int [n, 2] original (h, w) of the first n images, which the canvases need (the
  sources know them without decoding: `source.coco_gt` lists them). Without it, or with
  config.data.eval_buckets='square', every batch is S x S, in source order.
  """
  batcher = _Batcher(source, data_config)
  n = len(source) if num_images <= 0 else min(num_images, len(source))
  first_row, local = _host_slice(global_batch_size, process_index, process_count)
  if image_hw is None:
    s = batcher.image_size
    ids = np.arange(n, dtype=np.int64)
    plan = [((s, s), ids[k:k + global_batch_size]) for k in range(0, n, global_batch_size)]
  else:  # With eval_buckets='square' this is the same plan: one canvas, source order.
    if len(image_hw) != n:
      raise ValueError(f'image_hw has {len(image_hw)} sizes for {n} images.')
    plan = eval_plan(data_config, global_batch_size, image_hw)

  def make(b: int) -> dict[str, np.ndarray]:
    canvas, members = plan[b]
    rows = first_row + np.arange(local)
    return batcher.rows([(int(members[r]), False, None) if r < len(members) else None
                         for r in rows], canvas)

  return _prefetch(make, iter(range(len(plan))), batcher.prefetch)


def normalize_images(images: jax.Array, image_hw: jax.Array, mean: Sequence[float],
                     std: Sequence[float]) -> jax.Array:
  """On device: uint8 or float32 [B, S, S, 3] -> float32 [B, S, S, 3], (x - mean) / std, 0
  outside image_hw.

  image_hw: int [B, 2] (h, w) of the valid top-left region. The padding is exactly 0 after
  normalising, as torchvision pads normalised images (a padded 0 pixel would otherwise become
  -mean / std). Jit-able; mean and std may be Python tuples (config.data.pixel_mean/std).
  """
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  ys = jnp.arange(images.shape[1])[None, :, None]
  xs = jnp.arange(images.shape[2])[None, None, :]
  valid = (ys < image_hw[:, 0, None, None]) & (xs < image_hw[:, 1, None, None])
  return jnp.where(valid[..., None], x, 0.0)
