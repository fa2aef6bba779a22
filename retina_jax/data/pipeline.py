"""The input plumbing: the source factory, the worker threads that decode and preprocess rows,
the prefetch thread, and the batches of training (`TrainLoader`) and evaluation (`eval_batches`).

What each batch holds is decided from sizes alone by `retina_jax.data.sampler` (the training
index stream, resume, hosts; the eval plan); each row is made by
`retina_jax.data.preprocess.preprocess` (resize, crop, flips, photometric, padding, in that
order) into the canvas that `retina_jax.data.canvas` gives its batch.

Host batch (numpy; this host's rows of the global batch; the lead's sharding code assembles the
global jax.Array):
  'image'         uint8   [B, Hc, Wc, 3] RGB, the resized image at the top left, 0 elsewhere;
                          (Hc, Wc) the batch's canvas (`retina_jax.data.canvas`: S x S under
                          'square', else one per batch)
                          (float32 under config.data.resize='torchvision': `resize.image_dtype`)
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
                          (config.data.resize: `resize.resize_geometry`)
  'example_valid' bool    [B] False on eval padding (and on skipped unreadable images)
  'cropped_out'   int32   [B] objects and crowd regions a training crop dropped (host-side)
S = config.data.image_size, G = config.data.max_boxes. Normalisation happens on device
(`preprocess.normalize_images`).
"""

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import numpy as np

from retina_jax import sizes
from retina_jax.data import augment, canvas as canvas_lib, sampler, shapes
from retina_jax.data.coco_format import BadImageError, CocoFormatSource
from retina_jax.data.preprocess import preprocess
from retina_jax.data.resize import image_dtype
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
  return TfdsSource(data_config.name, split, data_config.tfds_data_dir,
                    size_index_dir=data_config.get('size_index_dir', ''),
                    num_workers=int(data_config.num_workers))


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
    self.data_config = data_config
    sizes.check_canvases(data_config)  # What TrainLoader and eval_batches used directly need.
    self.image_size = int(data_config.image_size)
    self.max_boxes = int(data_config.max_boxes)
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
    row = preprocess(example, self.data_config, flip=flip, draw=draw,
                     canvas=batch['image'].shape[1:3], image_out=batch['image'][r])
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


class TrainLoader:
  """Training batches as a pure function of (seed, step) (`sampler.TrainSampler`).

  `batch(step)` builds this host's part of global batch `step` synchronously; `iterate(start)`
  yields batches start, start + 1, ... forever, built ahead by a background thread. The
  canvases come from config.data.train_buckets (`canvas.train_canvases`); with more than one,
  every global batch holds images of one canvas.
  """

  def __init__(self, source: Source, data_config, global_batch_size: int, seed: int, *,
               process_index: int | None = None, process_count: int | None = None):
    self._batcher = _Batcher(source, data_config)
    self.source = source
    augment.validate(data_config)
    self._cropped_out = 0  # Objects and crowd regions dropped by crops so far (for the log).
    self.global_batch_size = int(global_batch_size)
    buckets = data_config.get('train_buckets', 'square')
    hw = getattr(source, 'original_hw', None)
    if buckets != 'square' and hw is None:
      logging.warning('config.data.train_buckets=%r needs the image sizes before decoding, which '
                      '%s does not list: training in the square bucket.', buckets,
                      type(source).__name__)
      buckets = 'square'
    self.canvases, groups = canvas_lib.train_canvases(data_config, hw, buckets,
                                                      augment.largest_min_size(data_config))
    self._sampler = sampler.TrainSampler(
        len(source), self.global_batch_size, seed, groups=groups,
        random_flip=bool(data_config.random_flip),
        draw_config=data_config if augment.enabled(data_config) else None,
        process_index=process_index, process_count=process_count)
    self.local_batch_size = self._sampler.local_batch_size
    logging.info('Training canvases (train_buckets=%r): %s with %s images.', buckets,
                 self.canvases, self._sampler.group_sizes.tolist())

  @property
  def steps_per_epoch(self) -> float:
    return len(self.source) / self.global_batch_size

  def example_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (source indices int64 [B], flips bool [B]) of this host's rows of global batch `step`."""
    return self._sampler.rows(step)[:2]

  def canvas(self, step: int) -> tuple[int, int]:
    """(Hc, Wc) of global batch `step`."""
    return self.canvases[self._sampler.group(step)]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    indices, flips, draws, group = self._sampler.rows(step)
    batch = self._batcher.rows(list(zip(indices, flips, draws)), self.canvases[group])
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


def eval_batches(source: Source, data_config, global_batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 num_images: int = 0, image_hw: np.ndarray | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every image of the first `num_images` (0: all) exactly once across all hosts.

  Global batch b holds GB images that share one canvas (`sampler.eval_plan`: images grouped
  by `canvas.eval_canvas`, in source order within a group); host i takes its rows of it. Every
  host yields the same batches (collectives stay in step); rows past a group's end are padding
  with example_valid False and image_id -1. No flip; orig_hw, scale and image_id come along for
  mapping detections back to the original image.

  image_hw: int [n, 2] original (h, w) of the first n images, which the canvases need (the
  sources know them without decoding: `source.coco_gt` lists them). Without it, or with
  config.data.eval_buckets='square', every batch is S x S, in source order.
  """
  batcher = _Batcher(source, data_config)
  n = len(source) if num_images <= 0 else min(num_images, len(source))
  first_row, local = sampler.host_slice(global_batch_size, process_index, process_count)
  if image_hw is not None and len(image_hw) != n:
    raise ValueError(f'image_hw has {len(image_hw)} sizes for {n} images.')
  # With eval_buckets='square' the plan with image_hw is the one without: source order.
  plan = sampler.eval_plan(data_config, global_batch_size, image_hw, num_images=n)

  def make(b: int) -> dict[str, np.ndarray]:
    canvas, members = plan[b]
    rows = first_row + np.arange(local)
    return batcher.rows([(int(members[r]), False, None) if r < len(members) else None
                         for r in rows], canvas)

  return _prefetch(make, iter(range(len(plan))), batcher.prefetch)
