"""Host input pipeline throughput (images/s): demo size on shapes, and 800 px on COCO-sized JPEGs.

  python benchmarks/input_pipeline.py [--workers 2] [--batches 20] [--augment]

Prints one JSON object. The 800 px case writes 64 random-texture 640x480 JPEGs (COCO's typical
size) in COCO layout to a temporary directory, so it needs no download. --augment turns on every
training augmentation (large-scale jitter 0.1-2.0 with crops, photometric distortion, vertical
flips; quarter turns where the canvas is square), to compare with the flip-only default.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax.data import pipeline


def _coco_like(root: str, n: int = 64) -> str:
  os.makedirs(os.path.join(root, 'train'))
  os.makedirs(os.path.join(root, 'annotations'))
  rng = np.random.default_rng(0)
  images, anns = [], []
  for k in range(n):
    h, w = (480, 640) if k % 3 else (640, 480)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # Smooth-ish, JPEG-like.
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(
        os.path.join(root, 'train', f'{k}.jpg'), quality=90)
    images.append({'id': k + 1, 'file_name': f'{k}.jpg', 'width': w, 'height': h})
    for j in range(7):  # COCO averages ~7 objects per image.
      anns.append({'id': len(anns) + 1, 'image_id': k + 1, 'category_id': 1, 'iscrowd': 0,
                   'bbox': [10.0 * j, 20.0, 50.0, 60.0], 'area': 3000.0})
  with open(os.path.join(root, 'annotations', 'instances_train.json'), 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'x'}]}, f)
  return root


AUGMENTED = {'scale_jitter': (0.1, 2.0), 'random_vflip': True, 'brightness': 0.3,
             'contrast': 0.3, 'saturation': 0.3, 'hue': 0.05}


def _measure(cfg, batch_size: int, batches: int) -> float:
  loader = pipeline.TrainLoader(pipeline.create_source(cfg, 'train'), cfg, batch_size, seed=0,
                                process_index=0, process_count=1)
  it = loader.iterate(0)
  next(it)  # Warm-up: thread start, first epoch permutation.
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  return batches * batch_size / elapsed


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--augment', action='store_true')
  args = parser.parse_args()
  results = {'cpu_count': os.cpu_count(), 'machine': platform.processor() or platform.machine(),
             'num_workers': args.workers, 'augment': args.augment}
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
    results['demo_128px_images_per_s'] = round(_measure(cfg, 16, args.batches), 1)
    cfg.min_size, cfg.max_size, cfg.image_size = 192, 192, 256
    results['demo_192px_images_per_s'] = round(_measure(cfg, 16, args.batches), 1)
    cfg = config_lib.get_base_config().data
    cfg.name, cfg.root, cfg.num_workers = 'coco_format', _coco_like(os.path.join(tmp, 'c')), \
        args.workers
    cfg.image_size = 1408  # The default bucket for 1333 px (a multiple of 128).
    cfg.update(augment)
    results['coco_800px_bucket1408_images_per_s'] = round(
        _measure(cfg, 8, max(4, args.batches // 4)), 1)
  print(json.dumps(results))


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
