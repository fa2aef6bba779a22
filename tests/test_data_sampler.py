"""The sampler's index stream without images: which examples, flips, augmentation draws and
canvas each global batch gets, as a pure function of (seed, step), for any number of hosts and
for sizes that do not divide (N prime, a canvas group smaller than the batch); and the eval plan.

Pixels (that a row is made from the example the stream names) are test_data_pipeline.py's.
"""

import numpy as np
import pytest

from retina_jax import config as config_lib
from retina_jax.data import augment
from retina_jax.data import canvas as canvas_lib
from retina_jax.data import pipeline
from retina_jax.data import sampler


class SizedSource:
  """Just what TrainLoader's batch plan reads: a length and the original sizes."""
  object_counts = None

  def __init__(self, hw):
    self.original_hw = np.asarray(hw, np.int32)

  def __len__(self):
    return len(self.original_hw)


def _grouped_reference(seed, groups, gb, num_steps, flip):
  """Aspect-ratio grouping spelled out: the epoch permutations as one stream, each group's
  members in stream order GB at a time, batches in the order they fill up."""
  n = len(groups)
  stream = np.concatenate([sampler.epoch_permutation(seed, e, n) for e in range(8 * num_steps)])
  batches = []
  for g in np.unique(groups):
    positions = np.flatnonzero(groups[stream] == g)
    for k in range(len(positions) // gb):
      members = positions[k * gb:(k + 1) * gb]
      batches.append((members[-1], g, members))
  batches.sort(key=lambda b: b[0])
  out = []
  for _, g, members in batches[:num_steps]:
    flips = [np.random.default_rng((seed, 1, int(p))).random() < 0.5 for p in members]
    out.append((g, stream[members], np.asarray(flips) if flip else np.zeros(gb, bool)))
  return out


@pytest.mark.parametrize('seed', [0, 3])
def test_orientation_batches_are_aspect_ratio_grouping_as_a_pure_function_of_step(seed):
  rng = np.random.default_rng(seed)
  hw = [(100, 200) if rng.random() < 0.7 else (200, 100) for _ in range(13)]
  hw[0], hw[1] = (100, 200), (200, 100)  # Both canvases occur.
  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size, cfg.num_workers = 64, 128, 128, 1
  cfg.train_buckets = 'orientation'
  src = SizedSource(hw)
  loader = pipeline.TrainLoader(src, cfg, 4, seed=seed, process_index=0, process_count=1)
  assert loader.canvases == [(64, 128), (128, 64)]
  groups = np.asarray([0 if w >= h else 1 for h, w in hw])
  reference = _grouped_reference(seed, groups, 4, 40, flip=True)
  for step, (g, indices, flips) in enumerate(reference):
    got, got_flips = loader.example_indices(step)
    np.testing.assert_array_equal(got, indices, err_msg=f'step {step}')
    np.testing.assert_array_equal(got_flips, flips, err_msg=f'step {step}')
    assert loader.canvas(step) == loader.canvases[g]
  # Hosts take their rows of the same global batch, at any step (resume = pure function).
  halves = [pipeline.TrainLoader(src, cfg, 4, seed=seed, process_index=i, process_count=2)
            for i in range(2)]
  for step in (0, 7, 39, 1000):
    whole = loader.example_indices(step)[0]
    np.testing.assert_array_equal(
        np.concatenate([h.example_indices(step)[0] for h in halves]), whole)
    assert {h.canvas(step) for h in halves} == {loader.canvas(step)}
  # Each group's pass through the stream sees each of its images once.
  first = np.concatenate([indices for g, indices, _ in reference if g == 0])
  n0 = int((groups == 0).sum())
  assert sorted(first[:n0].tolist()) == np.flatnonzero(groups == 0).tolist()


def test_square_training_bucket_is_unchanged_and_single_canvas_groups_are_too():
  hw = [(100, 200), (200, 100), (150, 150)] * 3
  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size, cfg.num_workers = 128, 128, 128, 1
  src = SizedSource(hw)
  plain = pipeline.TrainLoader(src, cfg, 4, seed=0, process_index=0, process_count=1)
  cfg.train_buckets = 'orientation'  # Both orientations fit 128 x 128: one canvas, one group.
  grouped = pipeline.TrainLoader(src, cfg, 4, seed=0, process_index=0, process_count=1)
  assert plain.canvases == grouped.canvases == [(128, 128)]
  for step in range(10):
    n = len(hw)
    want = [sampler.epoch_permutation(0, p // n, n)[p % n]
            for p in range(4 * step, 4 * step + 4)]
    np.testing.assert_array_equal(plain.example_indices(step)[0], want)
    np.testing.assert_array_equal(grouped.example_indices(step)[0], want)


def test_eval_plan_groups_by_canvas_in_source_order():
  cfg = config_lib.get_base_config().data
  hw = [(480, 640), (640, 480), (480, 640), (427, 640), (640, 427), (500, 500), (480, 640)]
  plan = sampler.eval_plan(cfg, 2, hw)
  assert [(c, m.tolist()) for c, m in plan] == [
      ((800, 1344), [0, 2]), ((800, 1344), [3, 5]), ((800, 1344), [6]),
      ((1344, 800), [1, 4])]

def _draw_config():
  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size = 64, 128, 128
  cfg.train_min_sizes, cfg.scale_jitter, cfg.random_vflip = (64, 96), (0.5, 1.5), True
  assert augment.enabled(cfg)
  return cfg


# 13 examples (prime) in two canvas groups of 10 and 3; the second is smaller than the global
# batch of 6, so each of its batches spans epochs.
ODD_GROUPS = np.asarray([0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], np.int8)


@pytest.mark.parametrize('groups', [None, ODD_GROUPS], ids=['one_canvas', 'two_canvases'])
def test_resumed_and_reordered_steps_give_the_same_rows(groups):
  make = lambda: sampler.TrainSampler(13, 6, 5, groups=groups, random_flip=True,
                                      draw_config=_draw_config(), process_index=0,
                                      process_count=1)
  straight = make()
  want = [straight.rows(step) for step in range(25)]
  resumed = make()  # A fresh process, asked for the steps in another order.
  for step in np.random.default_rng(0).permutation(25):
    indices, flips, draws, group = resumed.rows(int(step))
    np.testing.assert_array_equal(indices, want[step][0])
    np.testing.assert_array_equal(flips, want[step][1])
    assert draws == want[step][2] and group == want[step][3]
    assert all(isinstance(d, augment.Draw) for d in draws)
  if groups is not None:
    reference = _grouped_reference(5, groups, 6, 25, flip=True)
    for step, (g, indices, flips) in enumerate(reference):
      np.testing.assert_array_equal(want[step][0], indices, err_msg=f'step {step}')
      np.testing.assert_array_equal(want[step][1], flips, err_msg=f'step {step}')
      assert want[step][3] == g
    assert {w[3] for w in want} == {0, 1}


@pytest.mark.parametrize('groups', [None, ODD_GROUPS], ids=['one_canvas', 'two_canvases'])
def test_three_hosts_take_their_rows_of_the_same_global_batch(groups):
  whole = sampler.TrainSampler(13, 6, 1, groups=groups, random_flip=True,
                               draw_config=_draw_config(), process_index=0, process_count=1)
  hosts = [sampler.TrainSampler(13, 6, 1, groups=groups, random_flip=True,
                                draw_config=_draw_config(), process_index=i, process_count=3)
           for i in range(3)]
  assert [h.local_batch_size for h in hosts] == [2, 2, 2]
  for step in (0, 1, 7, 40, 10_000):
    indices, flips, draws, group = whole.rows(step)
    parts = [h.rows(step) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), indices)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), flips)
    assert [d for p in parts for d in p[2]] == draws
    assert {p[3] for p in parts} == {group}
    assert {h.group(step) for h in hosts} == {whole.group(step)}


def test_one_canvas_sees_every_example_once_per_epoch_across_batch_boundaries():
  s = sampler.TrainSampler(13, 6, 2, random_flip=False, process_index=0, process_count=1)
  order = np.concatenate([s.rows(step)[0] for step in range(7)])  # 42 = 3 epochs + 3.
  epochs = [order[e * 13:(e + 1) * 13] for e in range(3)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(13))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.concatenate([s.rows(step)[1] for step in range(7)]).any()  # random_flip off.
  assert s.rows(0)[2] == [None] * 6 and s.group(3) == 0


def test_host_slice_and_bad_sizes():
  assert [sampler.host_slice(12, i, 3) for i in range(3)] == [(0, 4), (4, 4), (8, 4)]
  with pytest.raises(ValueError, match='not divisible'):
    sampler.host_slice(5, 0, 2)
  with pytest.raises(ValueError, match='no images'):
    sampler.TrainSampler(0, 4, 0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='12 canvas groups for 13'):
    sampler.TrainSampler(13, 4, 0, groups=ODD_GROUPS[:12], process_index=0, process_count=1)


def test_eval_plan_of_odd_sizes_covers_every_image_once_on_every_host():
  cfg = config_lib.get_base_config().data
  hw = [(480, 640) if g == 0 else (640, 480) for g in ODD_GROUPS]
  plan = sampler.eval_plan(cfg, 6, hw)
  assert [len(m) for _, m in plan] == [6, 4, 3]  # Each canvas's last batch short.
  assert sorted(np.concatenate([m for _, m in plan]).tolist()) == list(range(13))
  for c, members in plan:
    assert {canvas_lib.eval_canvas(cfg, *hw[i]) for i in members} == {c}
  # Three hosts take rows [2i, 2i + 2) of each global batch; padding past a batch's end.
  rows = [[m[r] for _, m in plan for r in range(2 * i, 2 * i + 2) if r < len(m)]
          for i in range(3)]
  assert sorted(sum(rows, [])) == list(range(13))
  square = sampler.eval_plan(cfg, 6, None, num_images=13)
  assert len(square) == sampler.num_eval_batches(13, 6) == 3
  assert [(c, m.tolist()) for c, m in square] == [
      ((1408, 1408), list(range(6))), ((1408, 1408), list(range(6, 12))), ((1408, 1408), [12])]
  cfg.eval_buckets = 'square'  # With sizes: the same plan as without them.
  assert [(c, m.tolist()) for c, m in sampler.eval_plan(cfg, 6, hw)] == [
      (c, m.tolist()) for c, m in square]


def test_a_source_without_sizes_trains_in_the_square_bucket_with_a_warning(caplog):
  class Unsized:  # No original_hw.
    object_counts = None

    def __len__(self):
      return 5

  cfg = config_lib.get_base_config().data
  cfg.min_size, cfg.max_size, cfg.image_size, cfg.num_workers = 64, 128, 128, 1
  cfg.train_buckets = 'orientation'
  with caplog.at_level('INFO'):
    loader = pipeline.TrainLoader(Unsized(), cfg, 1, seed=0, process_index=0, process_count=1)
  assert loader.canvases == [(128, 128)]
  warned = [r for r in caplog.records if r.levelname == 'WARNING']
  assert len(warned) == 1 and 'Unsized does not list' in warned[0].getMessage()
  assert "Training canvases (train_buckets='square'): [(128, 128)]" in caplog.text
