"""A/B of the CPU conv formulation in `retina_jax/models/layers.py`, one process, interleaved.

  python -m benchmarks.cpu_conv_ab [--rounds 6] [--old einsum|trace-time]

'new' is the code as it is. 'old' is patched in:
- einsum: the formulation before commit 6da6196: 4-D einsums, autodiff for 1x1 (XLA CPU then
  copied gradients into transposed layouts), where 'new' has weight-gradient GEMMs on 2-D
  [pixels, channels] views and 1x1 convolutions with an explicit VJP;
- trace-time: the CPU formulation called directly, as when `conv2d` chose it from
  `jax.default_backend()` at trace time, where 'new' chooses it per platform when lowering
  (`lax.platform_dependent`).
Both are the R50-FPN train step of `compare_torchvision --what train` (batch 2, 512 px, fp32).
"""

import argparse
import statistics

import jax.numpy as jnp

from benchmarks import compare_torchvision
from retina_jax import cli
from retina_jax.models import layers


def _old_pixels_contraction(x, dy):
  return jnp.einsum('bhwc,bhwo->co', x, dy, preferred_element_type=jnp.float32)


def _old_conv2d(x, kernel, stride=1, pad=0):
  if kernel.shape[0] == 1 and kernel.shape[1] == 1 and pad == 0:
    return jnp.einsum('bhwc,co->bhwo', x[:, ::stride, ::stride], kernel[0, 0],
                      preferred_element_type=jnp.float32).astype(x.dtype)
  return layers._conv_gemm_wgrad(x, kernel, stride, pad)  # pylint: disable=protected-access


def _trace_time_conv2d(x, kernel, stride=1, pad=0):
  # pylint: disable=protected-access
  if kernel.shape[0] == 1 and kernel.shape[1] == 1 and pad == 0:
    return layers._conv1x1(x, kernel, stride)
  return layers._conv_gemm_wgrad(x, kernel, stride, pad)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--old', choices=('einsum', 'trace-time'), default='einsum')
  args = parser.parse_args(argv)
  bench = argparse.Namespace(precision='fp32', batch=2, height=512, width=512, num_boxes=8,
                             device='cpu')
  batch = compare_torchvision.make_batch(2, 512, 512, 8)
  runs = {'new': compare_torchvision.ours_train(bench, *batch)[0]}
  # The step is traced and compiled inside ours_train, so patching first gives the old program.
  saved = layers._pixels_contraction, layers.conv2d  # pylint: disable=protected-access
  if args.old == 'einsum':
    layers._pixels_contraction, layers.conv2d = _old_pixels_contraction, _old_conv2d
  else:
    layers.conv2d = _trace_time_conv2d
  try:
    runs['old'] = compare_torchvision.ours_train(bench, *batch)[0]
  finally:
    layers._pixels_contraction, layers.conv2d = saved
  for run in runs.values():
    run()
  times = compare_torchvision.timeit(runs, args.rounds)
  med = {name: statistics.median(t) for name, t in times.items()}
  print(f"old {med['old']:.3f} s  new {med['new']:.3f} s  new / old {med['new'] / med['old']:.3f}")


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
