"""What each resize rule costs per image, up to the image on the device (ratios in one run).

  python -m benchmarks.resize_rules [--repeats 20]

At COCO's 800 / 1333, for a 480x640 image (upsampled to 800x1066) and a 1080x1920 one
(downsampled to 750x1333), interleaved, median of --repeats:
  pil                config.data.resize='pil': PIL bilinear on uint8, uint8 canvas to the device;
  torchvision        config.data.resize='torchvision' as the pipeline runs it: XLA on the host's
                     CPU (`resize.interpolate_torchvision`), float32 canvas (4x the bytes) to
                     the device;
  torchvision_numpy  the same interpolation in numpy float32 on the host, float32 to the device;
  torchvision_dev    the same interpolation by XLA on the default device from the uint8 original
                     (padded to multiples of 64) and the taps. On a CPU-only machine the device
                     is the host CPU, so it equals `torchvision` minus the float32 copy back.
Prints one JSON object: seconds per image, each / pil, and the largest difference between the
torchvision variants and numpy's (all equal torchvision's F.interpolate to float32 rounding).
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from retina_jax import cli
from retina_jax.data import resize


def _ceil(x: int, m: int) -> int:
  return -(-x // m) * m


def _numpy_interpolate(image: np.ndarray, hw) -> np.ndarray:
  x = image.astype(np.float32)
  i0, i1, w0, w1 = resize._linear_taps(image.shape[1], hw[1])  # pylint: disable=protected-access
  x = x[:, i0] * w0[None, :, None] + x[:, i1] * w1[None, :, None]
  i0, i1, w0, w1 = resize._linear_taps(image.shape[0], hw[0])  # pylint: disable=protected-access
  return x[i0] * w0[:, None, None] + x[i1] * w1[:, None, None]


def _rules(image: np.ndarray):
  h, w = image.shape[:2]
  hw, _ = resize.resize_geometry(h, w, 800, 1333, 1408, 'torchvision')
  hw_pil, _ = resize.resize_geometry(h, w, 800, 1333, 1408, 'pil')
  canvas = (_ceil(hw[0], 32), _ceil(hw[1], 32))
  device = jax.devices()[0]

  def on_device(resized, dtype):
    out = np.zeros(canvas + (3,), dtype)
    out[:resized.shape[0], :resized.shape[1]] = resized
    return jax.device_put(out, device).block_until_ready()

  return {
      'pil': lambda: on_device(resize.resize_image(image, hw_pil, 'pil'), np.uint8),
      'torchvision': lambda: on_device(resize.resize_image(image, hw, 'torchvision'),
                                       np.float32),
      'torchvision_numpy': lambda: on_device(_numpy_interpolate(image, hw), np.float32),
      'torchvision_dev': lambda: resize.interpolate_torchvision(
          image, hw, device).block_until_ready(),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  results = {'device': str(jax.devices()[0].device_kind), 'cpu_count': os.cpu_count(),
             'machine': platform.processor() or platform.machine()}
  for h, w in ((480, 640), (1080, 1920)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rules = _rules(image)
    ref = np.asarray(rules['torchvision_numpy']())
    diffs = {n: float(np.abs(np.asarray(rules[n]()) - ref).max())
             for n in ('torchvision', 'torchvision_dev')}  # Also the warm-up (compilations).
    times = {name: [] for name in rules}
    for _ in range(args.repeats):
      for name, fn in rules.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) for name, t in times.items()}
    results[f'{h}x{w}'] = {'seconds': med, 'over_pil': {n: med[n] / med['pil'] for n in med},
                           'max_abs_diff_to_numpy': diffs}
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  cli.skip_absent_tpu()
  main()
