"""Evaluation throughput: our `evaluate_variables` against torchvision's RetinaNet evaluated on
the same images with the same pycocotools code, in one run.

  python -m benchmarks.eval_throughput [--images 32] [--size 320] [--json]

Both sides: R50-FPN RetinaNet with random weights (frozen BN), the shapes validation images
resized to `--size` (shorter side, longer side capped at the same), decoding, the forward pass,
post-processing, mapping back to original pixels and COCO evaluation all timed. Images/s is
wall clock over the whole evaluation; the second of two rounds is reported (the first compiles).
"""

import argparse
import json
import platform
import time

import jax
import numpy as np

from retina_jax import cli
from retina_jax import config as config_lib
from retina_jax.evaluation import evaluator
from retina_jax import models
from retina_jax.data import pipeline
from retina_jax.evaluation import coco_eval


def make_config(args):
  config = config_lib.get_base_config()
  config.model.backbone = 'resnet50'
  config.model.dtype = 'float32'
  config.model.num_classes = 5
  config.data.name = 'shapes'
  config.data.eval_split = 'validation'
  config.data.min_size = args.size
  config.data.max_size = args.size
  config.data.image_size = -(-args.size // 128) * 128
  config.data.max_eval_images = args.images
  config.eval_batch_size = 1
  return config


def ours(config):
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(0, impl='rbg'),
                                    config.data.image_size)

  def run():
    return evaluator.evaluate_variables(config, variables, workdir='')

  return run


def torchvision_eval(config, source):
  import torch
  from torchvision.models import resnet50
  from torchvision.models.detection import RetinaNet
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import misc as misc_ops
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7
  torch.manual_seed(0)
  backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d),
                                   3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
  model = RetinaNet(backbone, num_classes=config.model.num_classes,
                    min_size=config.data.min_size, max_size=config.data.max_size).eval()
  ids = np.asarray(source.categories.ids)
  n = config.data.max_eval_images

  def run():
    results = []
    with torch.no_grad():
      for i in range(n):
        example = source[i]
        image = torch.from_numpy(np.array(example['image'])).permute(2, 0, 1).float().div(255)
        out = model([image])[0]
        for box, score, label in zip(out['boxes'].numpy(), out['scores'].numpy(),
                                     out['labels'].numpy()):
          x1, y1, x2, y2 = (float(v) for v in box)
          results.append({'image_id': int(example['image_id']),
                          'category_id': int(ids[label]), 'bbox': [x1, y1, x2 - x1, y2 - y1],
                          'score': float(score)})
    return coco_eval.evaluate_detections(source.coco_gt(n), results)

  return run


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=32)
  parser.add_argument('--size', type=int, default=320)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv)
  import torch
  config = make_config(args)
  source = pipeline.create_source(config.data, config.data.eval_split)
  contenders = {'ours': ours(config), 'torchvision': torchvision_eval(config, source)}
  seconds = {}
  for name, run in contenders.items():
    run()  # Compile / warm up.
    t0 = time.perf_counter()
    run()
    seconds[name] = time.perf_counter() - t0
  rate = {k: args.images / v for k, v in seconds.items()}
  result = {'images': args.images, 'size': args.size, 'ours_images_per_s': rate['ours'],
            'torchvision_images_per_s': rate['torchvision'],
            'speedup': rate['ours'] / rate['torchvision'], 'device': jax.devices()[0].device_kind,
            'machine': platform.machine(), 'torch_threads': torch.get_num_threads(),
            'date': time.strftime('%Y-%m-%d')}
  print(json.dumps(result) if args.json else '\n'.join(f'{k:>26}: {v}' for k, v in result.items()))


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
