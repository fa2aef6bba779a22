"""Our jitted RetinaNet step against torchvision's, same architecture, same batch, same threads.

  python -m benchmarks.compare_torchvision --what train [--batch 2 --size 512] [--json]
  python -m benchmarks.compare_torchvision --what infer [--batch 1 --height 800 --width 1344]

Both sides are R50-FPN RetinaNet with frozen batch norm, stem and res2 frozen (torchvision's
`trainable_backbone_layers=3`, our `freeze_at=2`), 91 classes, float32 on CPU (bf16 for ours and
autocast for torchvision with --precision bf16 on a GPU). 'train' times one SGD step (forward,
matching, loss, backward, update) after compilation / warm-up; 'infer' times the forward pass
with post-processing (score threshold, top-k, decode, NMS). Only the ratio ours / torchvision is
meaningful: the machines are shared and noisy, so both are measured in the same run, interleaved.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def make_batch(batch: int, height: int, width: int, num_boxes: int, seed: int = 0):
  """Random images (uint8) and random ground truth boxes (x1, y1, x2, y2) pixels."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
  xy = rng.uniform(0, 0.7, size=(batch, num_boxes, 2)) * [width, height]
  wh = rng.uniform(0.05, 0.3, size=(batch, num_boxes, 2)) * [width, height]
  boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], -1).astype(np.float32)
  labels = rng.integers(1, 91, size=(batch, num_boxes)).astype(np.int32)
  return images, boxes, labels


def ours_config(args):
  from retina_jax import config as config_lib
  config = config_lib.get_base_config()
  config.model.backbone = 'resnet50'
  config.model.num_classes = 91
  config.model.norm = 'frozen_bn'
  config.model.freeze_at = 2
  config.model.dtype = 'bfloat16' if args.precision == 'bf16' else 'float32'
  config.batch_size = args.batch
  config.data.image_size = max(args.height, args.width)
  config.data.max_boxes = args.num_boxes
  return config


def ours_train(args, images, boxes, labels):
  from retina_jax import models
  from retina_jax import sharding as sharding_lib
  from retina_jax import train
  config = ours_config(args)
  config.data.image_size = args.height  # Square for training: height == width.
  mesh = sharding_lib.make_mesh(config)
  model = models.create_model(config)
  state, tx = train.create_train_state(config, model, mesh)
  step = train.make_train_step(config, model, tx, mesh)
  b, g = labels.shape
  host = {'image': images, 'image_hw': np.tile([[args.height, args.width]], (b, 1)).astype(np.int32),
          'boxes': boxes, 'labels': labels - 1, 'is_crowd': np.zeros((b, g), bool),
          'box_valid': np.ones((b, g), bool)}
  batch = sharding_lib.to_global(host, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  analysis = compiled.memory_analysis()
  memory = None if analysis is None else int(
      analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
      analysis.output_size_in_bytes)
  holder = {'state': state}

  def run():
    holder['state'], m = compiled(holder['state'], batch)
    jax.block_until_ready(m)

  return run, compile_s, memory


def ours_infer(args, images):
  from retina_jax import inference
  from retina_jax import models
  config = ours_config(args)
  # Each side padded to a multiple of 32, as torchvision does (P6 / P7 get ceil grids).
  padded_hw = (-(-args.height // 32) * 32, -(-args.width // 32) * 32)
  padded = np.zeros((args.batch, *padded_hw, 3), np.uint8)
  padded[:, :args.height, :args.width] = images
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(0, impl='rbg'), padded_hw)
  detect = inference.make_detect_fn(config)
  hw = jnp.asarray(np.tile([[args.height, args.width]], (args.batch, 1)), jnp.int32)
  padded = jnp.asarray(padded)
  t0 = time.perf_counter()
  jax.block_until_ready(detect(variables, padded, hw))
  compile_s = time.perf_counter() - t0
  return lambda: jax.block_until_ready(detect(variables, padded, hw)), compile_s


def torchvision_model(args):
  import torch
  from torchvision.models import resnet50
  from torchvision.models.detection import RetinaNet
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import misc as misc_ops
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7
  torch.manual_seed(0)
  backbone = resnet50(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d)
  backbone = _resnet_fpn_extractor(backbone, 3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
  size = max(args.height, args.width)
  model = RetinaNet(backbone, num_classes=91, min_size=min(args.height, args.width),
                    max_size=size)
  device = 'cuda' if args.device == 'gpu' else 'cpu'
  return model.to(device), device


def torchvision_train(args, images, boxes, labels):
  import torch
  model, device = torchvision_model(args)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
  imgs = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(device) for im in images]
  targets = [{'boxes': torch.from_numpy(b).to(device), 'labels': torch.from_numpy(l).long().to(device)}
             for b, l in zip(boxes, labels)]
  autocast = args.precision == 'bf16' and device == 'cuda'

  def run():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = sum(model(imgs, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  run()
  return run


def torchvision_infer(args, images):
  import torch
  model, device = torchvision_model(args)
  model.eval()
  imgs = [torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(device) for im in images]
  autocast = args.precision == 'bf16' and device == 'cuda'

  def run():
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      model(imgs)
    if device == 'cuda':
      torch.cuda.synchronize()

  run()
  return run


def timeit(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Interleaves the contenders so that machine noise hits both alike."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--what', choices=['train', 'infer'], default='train')
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--size', type=int, default=None, help='square images of this side')
  parser.add_argument('--height', type=int, default=None)
  parser.add_argument('--width', type=int, default=None)
  parser.add_argument('--num_boxes', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
  parser.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
  parser.add_argument('--json', action='store_true', help='print one JSON line')
  args = parser.parse_args(argv)
  defaults = {'train': (2, 512, 512), 'infer': (1, 800, 1344)}[args.what]
  args.batch = args.batch or defaults[0]
  args.height = args.height or args.size or defaults[1]
  args.width = args.width or args.size or defaults[2]

  import torch
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  images, boxes, labels = make_batch(args.batch, args.height, args.width, args.num_boxes)
  memory = None
  if args.what == 'train':
    ours, compile_s, memory = ours_train(args, images, boxes, labels)
    theirs = torchvision_train(args, images, boxes, labels)
  else:
    ours, compile_s = ours_infer(args, images)
    theirs = torchvision_infer(args, images)
  ours()  # Warm caches after compile.
  times = timeit({'ours': ours, 'torchvision': theirs}, args.repeats)
  med = {k: statistics.median(v) for k, v in times.items()}
  result = {
      'what': args.what, 'batch': args.batch, 'height': args.height, 'width': args.width,
      'precision': args.precision, 'device': jax.devices()[0].device_kind,
      'machine': f'{platform.machine()} {threads} threads', 'ours_s': med['ours'],
      'torchvision_s': med['torchvision'], 'ratio': med['ours'] / med['torchvision'],
      'ours_compile_s': compile_s, 'ours_compiled_bytes': memory,
      'jax': jax.__version__, 'torch': torch.__version__,
      'date': time.strftime('%Y-%m-%d'),
  }
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f'{k:>20}: {v}')


if __name__ == '__main__':
  from retina_jax import cli  # pylint: disable=g-import-not-at-top
  cli.skip_absent_tpu()
  main()
