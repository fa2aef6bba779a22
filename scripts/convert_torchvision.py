"""Converts a torchvision ResNet (ImageNet) or RetinaNet (v1, v2) state dict into our variables.

  python scripts/convert_torchvision.py IN.pth OUT [--norm frozen_bn|bn] [--strict]

IN is a plain `torch.save(model.state_dict())`, or a training checkpoint that holds one under
'model' or 'state_dict' (torchvision's reference scripts), 'module.' (DDP) prefixes allowed.
OUT is flax msgpack of {'params', 'batch_stats'} (`retina_jax.convert.load_variables` reads it
without torch); point `config.init_from` at it (a RetinaNet under `--config
experiments/torchvision_compat.py`, `:v2` for retinanet_resnet50_fpn_v2's GroupNorm heads).
Every missing and unexpected key is printed; --strict makes either an error.
"""

import argparse
import pathlib
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from retina_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from retina_jax import convert  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('input', help='torch.save()d state dict (.pth)')
  parser.add_argument('output', help='where to write the flax msgpack variables')
  parser.add_argument('--norm', default='frozen_bn', choices=('frozen_bn', 'bn'),
                      help="config.model.norm the variables are for (default frozen_bn)")
  parser.add_argument('--strict', action='store_true',
                      help='fail if any key is missing or unexpected')
  args = parser.parse_args(argv)

  try:
    state_dict = convert.load_torch_state_dict(args.input)
  except ValueError as e:  # The message names the file.
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    variables, report = convert.convert_state_dict(state_dict, norm=args.norm)
  except ValueError as e:
    print(f'error: {args.input}: {e}', file=sys.stderr)
    return 1
  print(f'{args.input}: torchvision {report.kind}, architecture {report.architecture}')
  print(f'converted {report.num_converted} tensors')
  for key in report.missing:
    print(f'missing (left at init): {key}')
  for key in report.unexpected:
    print(f'unexpected (unused): {key}')
  if args.strict and (report.missing or report.unexpected):
    print(f'error: --strict and {len(report.missing)} missing, {len(report.unexpected)} '
          'unexpected keys; nothing written', file=sys.stderr)
    return 1
  convert.save_variables(variables, args.output)
  print(f'wrote {args.output}')
  return 0


if __name__ == '__main__':
  cli.skip_absent_tpu()
  sys.exit(main())
