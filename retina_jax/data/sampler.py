"""Which examples each batch holds, from sizes alone (no image is read): the training index
stream (`TrainSampler`) and the evaluation plan (`eval_plan`).

Resume design: where the training data stands is a pure function of (seed, step), never of
iterator state. The stream runs through epoch e's `permutation(seed, e)` of the N examples
(numpy's PCG64 seeded with (seed, 0, e)), epochs into each other without dropping a remainder,
so every example is seen once per epoch; stream position p is the example
`permutation(seed, p // N)[p % N]`. Its horizontal flip is drawn from (seed, 1, p), any other
augmentation (`retina_jax.data.augment`) from (seed, 2, p).

With one training canvas, global batch `step` holds stream positions step * GB + row, row < GB.
With several (config.data.train_buckets='orientation' or 'torchvision', images of more than
one canvas), every global batch holds images of one canvas, as detectron2's aspect-ratio
grouping does: each canvas group takes its own members from the stream in order, GB at a time,
and global batches come in the order in which they fill up (the stream position of their last
member). Every image is then seen once per pass of its group through the stream.

A run resumed at step s asks for batches s, s + 1, ... and gets exactly the batches an
uninterrupted run would have got: nothing repeated, nothing skipped, whatever the number of
workers, prefetch depth or restarts. The global batch is also the same for any number of hosts:
process i takes rows [i * B, (i + 1) * B) of it, B = global batch / process count.
"""

import functools
import math

import jax
import numpy as np

from retina_jax.data import augment
from retina_jax.data import canvas as canvas_lib


def host_slice(global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int]:
  """-> (first row of this host in the global batch, host-local batch size); this process's
  jax.process_index() / process_count() when None."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible by the '
                     f'{process_count} processes.')
  local = global_batch_size // process_count
  return process_index * local, local


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n examples in epoch `epoch` of the stream."""
  return np.random.default_rng((seed, 0, epoch)).permutation(n)


@functools.lru_cache(maxsize=8)
def _epoch_groups(seed: int, epoch: int, groups_key: bytes, num_groups: int
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
  """Epoch `epoch`'s stream of canvas groups: (running count of each group's members up to and
  including each position, int64 [N, G]; positions of each group's members, G arrays)."""
  groups = np.frombuffer(groups_key, np.int8)
  order = groups[epoch_permutation(seed, epoch, len(groups))]
  counts = np.cumsum(order[:, None] == np.arange(num_groups)[None], axis=0)
  return counts, [np.flatnonzero(order == g) for g in range(num_groups)]


class TrainSampler:
  """This host's rows of every global training batch, as a pure function of (seed, step); see
  the module docstring.

  num_examples: N. groups: int8 [N], each example's canvas group (None: one group).
  random_flip: draw horizontal flips. draw_config: the config.data whose augmentations
  (`augment.draw`) each row gets, None for none beyond the flip.
  """

  def __init__(self, num_examples: int, global_batch_size: int, seed: int, *,
               groups: np.ndarray | None = None, random_flip: bool = False, draw_config=None,
               process_index: int | None = None, process_count: int | None = None):
    if num_examples <= 0:
      raise ValueError('The training split has no images.')
    self.num_examples = int(num_examples)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.random_flip = bool(random_flip)
    self._draw_config = draw_config
    self._first_row, self.local_batch_size = host_slice(
        self.global_batch_size, process_index, process_count)
    self._groups = None if groups is None else np.asarray(groups, np.int8)
    if self._groups is not None:
      if len(self._groups) != self.num_examples:
        raise ValueError(f'{len(self._groups)} canvas groups for {self.num_examples} examples.')
      self._groups_key = self._groups.tobytes()  # Cache key of `_epoch_groups`.
      self.group_sizes = np.bincount(self._groups)
    else:
      self.group_sizes = np.asarray([self.num_examples])

  @property
  def num_groups(self) -> int:
    return len(self.group_sizes)

  def _stream_position(self, step: int) -> tuple[int, int]:
    """Global batch `step` of the canvas groups -> (its group, index of its first member in
    the group's stream)."""
    n, gb, num_groups = self.num_examples, self.global_batch_size, self.num_groups

    def group_counts(p):  # Members of each group at stream positions <= p.
      epoch, r = divmod(p, n)
      return epoch * self.group_sizes + _epoch_groups(self.seed, epoch, self._groups_key,
                                                      num_groups)[0][r]

    # The epoch in which the batch fills up: the first whose end has filled step + 1 batches
    # (a closed form: each group has passed through the stream epoch + 1 times by then).
    lo, hi = 0, -(-(step + 1 + num_groups) * gb // n)
    while lo < hi:
      mid = (lo + hi) // 2
      if int(((mid + 1) * self.group_sizes // gb).sum()) >= step + 1:
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
    group = int(self._groups[epoch_permutation(self.seed, epoch, n)[r]])
    return group, (int(group_counts(lo)[group]) // gb - 1) * gb

  def group(self, step: int) -> int:
    """The canvas group of global batch `step`."""
    return 0 if self.num_groups == 1 else self._stream_position(step)[0]

  def positions(self, step: int) -> tuple[np.ndarray, int]:
    """-> (stream positions int64 [B] of this host's rows of global batch `step`, its group)."""
    n = self.num_examples
    if self.num_groups == 1:
      return (step * self.global_batch_size + self._first_row
              + np.arange(self.local_batch_size, dtype=np.int64)), 0
    group, first = self._stream_position(step)
    size = int(self.group_sizes[group])
    positions = []
    for k in range(first + self._first_row, first + self._first_row + self.local_batch_size):
      epoch, j = divmod(k, size)  # The j-th member of `group` in epoch `epoch`.
      members = _epoch_groups(self.seed, epoch, self._groups_key, self.num_groups)[1]
      positions.append(epoch * n + int(members[group][j]))
    return np.asarray(positions, np.int64), group

  def rows(self, step: int) -> tuple[np.ndarray, np.ndarray, list, int]:
    """-> (example indices int64 [B], flips bool [B], augmentation draws [B] (None when off),
    group) of this host's rows of global batch `step`, from one walk of the stream."""
    positions, group = self.positions(step)
    n = self.num_examples
    indices = np.asarray([epoch_permutation(self.seed, int(p // n), n)[p % n]
                          for p in positions], np.int64)
    if self.random_flip:
      flips = np.asarray([np.random.default_rng((self.seed, 1, int(p))).random() < 0.5
                          for p in positions])
    else:
      flips = np.zeros(len(positions), bool)
    draws = [None if self._draw_config is None else
             augment.draw(self._draw_config, self.seed, int(p)) for p in positions]
    return indices, flips, draws, group


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return math.ceil(num_examples / global_batch_size)


def eval_plan(data_config, global_batch_size: int, image_hw: np.ndarray | None = None, *,
              num_images: int = 0) -> list[tuple[tuple[int, int], np.ndarray]]:
  """The global eval batches: [(canvas (Hc, Wc), source indices [<= GB])], every image once.

  image_hw: int [n, 2] (h, w) of the original images 0..n-1. Images are grouped by their
  `canvas.eval_canvas`, in source order within a canvas, canvases in order of first appearance;
  a canvas's last batch may be short (the rest of its rows are padding). None: the first
  `num_images` images in source order, every batch in the S x S bucket.
  """
  if image_hw is None:
    s = int(data_config.image_size)
    ids = np.arange(num_images, dtype=np.int64)
    return [((s, s), ids[k:k + global_batch_size])
            for k in range(0, num_images, global_batch_size)]
  image_hw = np.asarray(image_hw).reshape(-1, 2)
  canvases = [canvas_lib.eval_canvas(data_config, int(h), int(w)) for h, w in image_hw]
  plan = []
  for canvas in dict.fromkeys(canvases):
    members = np.asarray([i for i, c in enumerate(canvases) if c == canvas], np.int64)
    plan += [(canvas, members[k:k + global_batch_size])
             for k in range(0, len(members), global_batch_size)]
  return plan
