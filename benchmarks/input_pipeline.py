"""Host input pipeline throughput (images/s): demo size on shapes, and 800 px on COCO-sized JPEGs.

  python benchmarks/input_pipeline.py [--workers 2] [--batches 20] [--augment]
  python benchmarks/input_pipeline.py --recipes [--images 64] [--rounds 3]

Prints one JSON object. The 800 px cases write 64 photo-like JPEGs (COCO's sizes, 640x480 most
often, quality 90, ~120 KB each; 5-10 boxes of the 80 COCO categories per image) in COCO layout
to a temporary directory, so they need no download. --augment turns on every training
augmentation (large-scale jitter 0.1-2.0 with crops, photometric distortion, vertical flips;
quarter turns where the canvas is square), to compare with the flip-only default.

--recipes measures instead the COCO experiment's own recipe (experiments/retinanet_r50_coco.py at
res=800, its batch and orientation canvases; only data.name and data.root changed) for each
`aug` (flip, paper, lsj) with TrainLoader at data.num_workers 1 and 2, in interleaved rounds.
Per case: images/s (wall), images per CPU-second (the process's CPU time over all threads, which
the machine's other load disturbs less), cores busy (CPU-seconds per second: ~2 when two
workers both run; ~1 when the GIL or other jobs hold them back) and, at one worker, what one core
delivers; per aug the 2-worker / 1-worker ratio of each round, and the cores one host needs to
deliver --host_rate images/s (what `python -m retina_jax.tools.pod_plan` prints as "input at the
bound"). The load average before and after comes along: on a shared machine, trust the ratios.
"""

import argparse
import json
import math
import os
import platform
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax.data import categories, pipeline


# (h, w) of the generated images: COCO's landscape 640x480 most often, portrait and odd sizes.
_SIZES = ((480, 640), (640, 480), (480, 640), (427, 640), (480, 640), (640, 427), (375, 500),
          (480, 640), (612, 612), (500, 333))


def _photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3] noise smoothed at four scales: it compresses as photos do (~120 KB at 640 x
  480 and quality 90; COCO's JPEGs average ~160 KB), where flat or white noise would not."""
  out = np.full((h, w, 3), 127.5, np.float32)
  for cell, amplitude in ((64, 60.0), (16, 35.0), (4, 24.0), (1, 18.0)):
    small = rng.integers(0, 256, (-(-h // cell), -(-w // cell), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    out += amplitude * (smooth - 127.5) / 127.5
  return np.clip(out, 0, 255).astype(np.uint8)


def _coco_like(root: str, n: int = 64) -> str:
  os.makedirs(os.path.join(root, 'train'))
  os.makedirs(os.path.join(root, 'annotations'))
  rng = np.random.default_rng(0)
  category_map = categories.CategoryMap.coco_2017()
  images, anns = [], []
  for k in range(n):
    h, w = _SIZES[k % len(_SIZES)]
    Image.fromarray(_photo_like(rng, h, w)).save(os.path.join(root, 'train', f'{k}.jpg'),
                                                 quality=90)
    images.append({'id': k + 1, 'file_name': f'{k}.jpg', 'width': w, 'height': h})
    for _ in range(rng.integers(5, 11)):  # COCO averages ~7 objects per image.
      bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      anns.append({'id': len(anns) + 1, 'image_id': k + 1, 'iscrowd': 0,
                   'category_id': int(rng.choice(category_map.ids)),
                   'bbox': [x, y, bw, bh], 'area': bw * bh})
  with open(os.path.join(root, 'annotations', 'instances_train.json'), 'w') as f:
    json.dump({'images': images, 'annotations': anns,
               'categories': category_map.to_coco_categories()}, f)
  return root


AUGMENTED = {'scale_jitter': (0.1, 2.0), 'random_vflip': True, 'brightness': 0.3,
             'contrast': 0.3, 'saturation': 0.3, 'hue': 0.05}


def _measure(cfg, batch_size: int, batches: int) -> tuple[float, float]:
  """-> (images/s, images per CPU-second) of TrainLoader.iterate over `batches` batches."""
  loader = pipeline.TrainLoader(pipeline.create_source(cfg, 'train'), cfg, batch_size, seed=0,
                                process_index=0, process_count=1)
  it = loader.iterate(0)
  next(it)  # Warm-up: thread start, first epoch permutation.
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  it.close()
  # The prefetch thread finishes the batch it is building after close: wait for it, so that its
  # work does not run into the next case's timing.
  for thread in threading.enumerate():
    if thread.name == 'retina_jax-prefetch':
      thread.join()
  return batches * batch_size / elapsed, batches * batch_size / cpu


def _recipes(args) -> dict:
  """The COCO experiment's recipe per aug x data.num_workers, in interleaved rounds (see the
  module docstring); medians over rounds, and the per-round 2 / 1 worker ratios."""
  augs, workers = args.augs.split(','), [int(w) for w in args.worker_counts.split(',')]
  module = config_lib.load_experiment(args.experiment)
  runs = {(aug, n): [] for aug in augs for n in workers}
  with tempfile.TemporaryDirectory() as tmp:
    root = _coco_like(os.path.join(tmp, 'coco'), args.num_files)
    config = module.get_config(f'res={args.res},aug={augs[0]}')
    config.data.name, config.data.root = 'coco_format', root
    _measure(config.data, config.batch_size, 1)  # Untimed: the process's first-use costs.
    batches = max(1, math.ceil(args.images / config.batch_size))
    for _ in range(args.rounds):
      for aug in augs:
        for n in workers:
          config = module.get_config(f'res={args.res},aug={aug}')
          config.data.name, config.data.root, config.data.num_workers = 'coco_format', root, n
          runs[aug, n].append(_measure(config.data, config.batch_size, batches))
  out = {'images_per_case': batches * config.batch_size, 'batch_size': config.batch_size,
         'train_buckets': config.data.train_buckets}
  for aug in augs:
    row = {}
    for n in workers:
      wall, per_cpu = zip(*runs[aug, n])
      row[f'workers_{n}'] = {'images_per_s': round(float(np.median(wall)), 2),
                             'images_per_cpu_s': round(float(np.median(per_cpu)), 2),
                             # CPU-seconds per second: ~n when n threads all run.
                             'cores_busy': round(float(np.median(np.divide(wall, per_cpu))), 2),
                             'rounds_images_per_s': [round(x, 2) for x in wall]}
    if 1 in workers:
      one = row['workers_1']
      row['per_core_images_per_s'] = one['images_per_s']  # One decode thread ~ one core.
      row['cores_per_host'] = {'at_wall_rate': round(args.host_rate / one['images_per_s'], 1),
                               'at_cpu_rate': round(args.host_rate / one['images_per_cpu_s'], 1)}
      for n in workers:
        if n > 1:
          ratios = [b[0] / a[0] for a, b in zip(runs[aug, 1], runs[aug, n])]
          row[f'scaling_{n}_over_1'] = round(float(np.median(ratios)), 2)
          row[f'rounds_scaling_{n}_over_1'] = [round(r, 2) for r in ratios]
    out[aug] = row
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--augment', action='store_true')
  parser.add_argument('--recipes', action='store_true',
                      help="the COCO experiment's recipe per aug x num_workers (see above)")
  parser.add_argument('--experiment', default='experiments/retinanet_r50_coco.py')
  parser.add_argument('--res', type=int, default=800)
  parser.add_argument('--augs', default='flip,paper,lsj')
  parser.add_argument('--worker_counts', default='1,2')
  parser.add_argument('--images', type=int, default=64,
                      help='images timed per case and round (rounded up to whole batches)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--num_files', type=int, default=64, help='JPEGs generated')
  parser.add_argument('--host_rate', type=float, default=143.0,
                      help="images/s one host must deliver: pod_plan's 'input at the bound' "
                           '(143 for R50 at 800 px, batch 64 on v5e:4x4)')
  args = parser.parse_args()
  results = {'cpu_count': os.cpu_count(), 'machine': platform.processor() or platform.machine()}
  if args.recipes:
    load = os.getloadavg()[0]
    results.update(_recipes(args), host_rate=args.host_rate,
                   load_average_1min=[round(load, 2), round(os.getloadavg()[0], 2)])
    print(json.dumps(results))
    return
  results.update(num_workers=args.workers, augment=args.augment)
  augment = AUGMENTED if args.augment else {}
  with tempfile.TemporaryDirectory() as tmp:
    cfg = config_lib.get_base_config().data
    cfg.name, cfg.root, cfg.num_workers = 'shapes', os.path.join(tmp, 'shapes'), args.workers
    cfg.min_size, cfg.max_size, cfg.image_size = 128, 192, 128
    cfg.update(augment, random_rot90=args.augment)
    start = time.perf_counter()
    pipeline.create_source(cfg, 'train')
    results['shapes_generation_s'] = round(time.perf_counter() - start, 2)
    results['shapes_generation_images'] = cfg.shapes_num_train + cfg.shapes_num_eval
    results['demo_128px_images_per_s'] = round(_measure(cfg, 16, args.batches)[0], 1)
    cfg.min_size, cfg.max_size, cfg.image_size = 192, 192, 256
    results['demo_192px_images_per_s'] = round(_measure(cfg, 16, args.batches)[0], 1)
    cfg = config_lib.get_base_config().data
    cfg.name, cfg.root, cfg.num_workers = 'coco_format', _coco_like(os.path.join(tmp, 'c')), \
        args.workers
    cfg.image_size = 1408  # The default bucket for 1333 px (a multiple of 128).
    cfg.update(augment)
    results['coco_800px_bucket1408_images_per_s'] = round(
        _measure(cfg, 8, max(4, args.batches // 4))[0], 1)
  print(json.dumps(results))


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
