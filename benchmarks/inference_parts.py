"""Where R50-FPN inference time goes: backbone, + FPN, + heads, ours against torchvision's modules.

  python -m benchmarks.inference_parts [--height 800 --width 1344 --repeats 3] [--json]

Same architecture and settings as `compare_torchvision --what infer` (frozen BN, 91 classes,
float32, random weights), batch 1, without torchvision's transform and either side's
post-processing (see `postprocess_speed.py` for that). Each figure is the minimum of `repeats`
runs after one warm-up (and compilation, for ours).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import compare_torchvision


def _min_times(fns: dict, repeats: int) -> dict[str, float]:
  for fn in fns.values():
    fn()  # Warm-up (and compilation, for ours).
  return {k: min(v) for k, v in compare_torchvision.timeit(fns, repeats).items()}


def ours(args) -> dict[str, float]:
  from retina_jax import models
  from retina_jax.models import fpn as fpn_lib
  from retina_jax.models import resnet
  config = compare_torchvision.ours_config(args)
  m = config.model
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(0, impl='rbg'), (args.height, args.width))
  sub = lambda name: {col: tree[name] for col, tree in variables.items() if name in tree}
  backbone = resnet.ResNet(backbone=m.backbone, norm=m.norm, freeze_at=m.freeze_at,
                           dtype=jnp.float32)
  fpn = fpn_lib.FPN(channels=m.fpn_channels, min_level=m.min_level, max_level=m.max_level,
                    p6_from=m.p6_from)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, args.height, args.width, 3)),
                  jnp.float32)
  fns = {
      'backbone': jax.jit(lambda x: backbone.apply(sub('backbone'), x)),
      'backbone+fpn': jax.jit(lambda x: fpn.apply(sub('fpn'), backbone.apply(sub('backbone'), x))),
      'network': jax.jit(lambda x: model.apply(variables, x)),
  }
  return _min_times({k: (lambda f=f: jax.block_until_ready(f(x))) for k, f in fns.items()},
                    args.repeats)


def theirs(args) -> dict[str, float]:
  import torch
  torch.set_num_threads(os.cpu_count())  # As compare_torchvision: every core, both sides.
  model = compare_torchvision.torchvision_model(args)[0].eval()
  x = torch.randn(1, 3, args.height, args.width)
  fns = {
      'backbone': lambda: model.backbone.body(x),
      'backbone+fpn': lambda: model.backbone(x),
      'network': lambda: model.head(list(model.backbone(x).values())),
  }
  with torch.no_grad():
    return _min_times(fns, args.repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--height', type=int, default=800)
  parser.add_argument('--width', type=int, default=1344)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv)
  args.batch, args.num_boxes, args.precision, args.device = 1, 8, 'fp32', 'cpu'
  result = {'ours_s': ours(args), 'torchvision_s': theirs(args),
            'height': args.height, 'width': args.width, 'date': time.strftime('%Y-%m-%d')}
  if args.json:
    print(json.dumps(result))
  else:
    for part in result['ours_s']:
      print(f"{part:14s} ours {result['ours_s'][part]:.3f} s   "
            f"torchvision {result['torchvision_s'][part]:.3f} s")


if __name__ == '__main__':
  from retina_jax import cli  # pylint: disable=g-import-not-at-top
  cli.skip_absent_tpu()
  main()
