"""Wall time of postprocess.postprocess after jit (and, for reference, torchvision's).

  python benchmarks/postprocess_speed.py [--height 800 --width 1344 --classes 80 --batch 1]

Feature maps are torchvision's for an H x W input (ceil(H / 2**l) x ceil(W / 2**l)); the anchors
are ours for the padded size, cut to those rows. Logits ~ N(-5, 1.2): about 4% of the
(anchor, class) pairs pass the 0.05 threshold, so every level fills its 1000 candidates.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import anchors as anchors_lib
from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax import postprocess


def _median_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--height', type=int, default=800)
  parser.add_argument('--width', type=int, default=1344)
  parser.add_argument('--classes', type=int, default=80)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--torchvision', action='store_true')
  args = parser.parse_args()
  config = config_lib.get_base_config()
  levels = range(config.model.min_level, config.model.max_level + 1)
  a = anchors_lib.num_anchors_per_location(config.anchors)
  pad = 2 ** config.model.max_level
  padded = (-(-args.height // pad) * pad, -(-args.width // pad) * pad)
  full = anchors_lib.generate_anchors(config.anchors, levels[0], levels[-1], padded)
  full_sizes = anchors_lib.anchors_per_level(config.anchors, levels[0], levels[-1], padded)
  parts, level_sizes, start = [], [], 0
  for l, n in zip(levels, full_sizes):
    rows, cols = -(-args.height // 2 ** l), -(-args.width // 2 ** l)
    parts.append(full[start:start + rows * cols * a])
    level_sizes.append(rows * cols * a)
    start += n
  anchors = np.concatenate(parts)
  level_sizes = tuple(level_sizes)
  rng = np.random.default_rng(0)
  logits = rng.normal(-5.0, 1.2, (args.batch, len(anchors), args.classes)).astype(np.float32)
  deltas = rng.normal(0.0, 0.2, (args.batch, len(anchors), 4)).astype(np.float32)
  hw = np.tile([[args.height, args.width]], (args.batch, 1)).astype(np.int32)
  fn = jax.jit(lambda l, d, hw: postprocess.postprocess(
      l, d, anchors, level_sizes, hw, config.postprocess, config.box_coder))
  dl, dd, dhw = jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(hw)
  med, best = _median_ms(lambda: jax.block_until_ready(fn(dl, dd, dhw)), args.repeats)
  out = fn(dl, dd, dhw)
  print(f'device={jax.devices()[0].device_kind} B={args.batch} {args.height}x{args.width} '
        f'K={args.classes} N={len(anchors)} levels={level_sizes} '
        f'detections={int(out["valid"].sum())}')
  print(f'retina_jax postprocess (jit): median {med:.1f} ms, min {best:.1f} ms')
  if args.torchvision:
    import torch
    from torchvision.models.detection import retinanet
    model = retinanet.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                             num_classes=args.classes)
    model.detections_per_img = config.postprocess.max_detections
    split = np.cumsum(level_sizes)[:-1]
    head = {'cls_logits': [torch.from_numpy(x) for x in np.split(logits, split, axis=1)],
            'bbox_regression': [torch.from_numpy(x) for x in np.split(deltas, split, axis=1)]}
    tv_anchors = [[torch.from_numpy(x) for x in np.split(anchors, split)]] * args.batch
    shapes = [(args.height, args.width)] * args.batch
    with torch.no_grad():
      med, best = _median_ms(lambda: model.postprocess_detections(head, tv_anchors, shapes),
                             args.repeats)
    print(f'torchvision postprocess_detections ({torch.get_num_threads()} threads): '
          f'median {med:.1f} ms, min {best:.1f} ms')


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
