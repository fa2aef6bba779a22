"""What each resize rule costs per image, up to the image on the device (ratios in one run).

  python -m benchmarks.resize_rules [--repeats 20]

At COCO's 800 / 1333, for a 480x640 image (upsampled to 800x1066) and a 1080x1920 one
(downsampled to 750x1333), interleaved, median of --repeats:
  pil               config.data.resize='pil': PIL bilinear on uint8, uint8 canvas to the device;
  torchvision_host  config.data.resize='torchvision' as the pipeline does it: numpy float32
                    interpolation on the host, float32 canvas (4x the bytes) to the device;
  torchvision_dev   the same interpolation on the device from the uint8 original (padded to a
                    multiple of 64) and the host's taps: a jitted gather per axis. Exact too,
                    but one compilation per (original canvas, resized canvas) pair.
Prints one JSON object: seconds per image, each rule / pil, and the largest difference between
the two torchvision variants (0 up to float32 rounding: both are exact).
"""

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax.data import pipeline


def _ceil(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnums=(2,))
def _device_resize(image, taps, canvas):
  """uint8 [Hi, Wi, 3] original (zero-padded) -> float32 [Hc, Wc, 3]; taps as _linear_taps,
  padded past the resized sides with weight 0."""
  (yi0, yi1, yw0, yw1), (xi0, xi1, xw0, xw1) = taps
  x = image.astype(jnp.float32)
  x = x[:, xi0] * xw0[None, :, None] + x[:, xi1] * xw1[None, :, None]
  out = x[yi0] * yw0[:, None, None] + x[yi1] * yw1[:, None, None]
  return out.reshape(canvas + (3,))


def _padded_taps(in_size: int, out_size: int, canvas: int):
  i0, i1, w0, w1 = pipeline._linear_taps(in_size, out_size)  # pylint: disable=protected-access
  pad = canvas - out_size
  return (np.pad(i0, (0, pad)), np.pad(i1, (0, pad)), np.pad(w0, (0, pad)), np.pad(w1, (0, pad)))


def _rules(image: np.ndarray):
  h, w = image.shape[:2]
  hw, _ = pipeline.resize_geometry(h, w, 800, 1333, 1408, 'torchvision')
  hw_pil, _ = pipeline.resize_geometry(h, w, 800, 1333, 1408, 'pil')
  canvas = (_ceil(hw[0], 32), _ceil(hw[1], 32))

  def pil():
    out = np.zeros(canvas + (3,), np.uint8)
    out[:hw_pil[0], :hw_pil[1]] = pipeline.resize_image(image, hw_pil, 'pil')
    return jax.device_put(out).block_until_ready()

  def torchvision_host():
    out = np.zeros(canvas + (3,), np.float32)
    out[:hw[0], :hw[1]] = pipeline.resize_image(image, hw, 'torchvision')
    return jax.device_put(out).block_until_ready()

  def torchvision_dev():
    padded = np.zeros((_ceil(h, 64), _ceil(w, 64), 3), np.uint8)
    padded[:h, :w] = image
    taps = (_padded_taps(h, hw[0], canvas[0]), _padded_taps(w, hw[1], canvas[1]))
    return _device_resize(jax.device_put(padded), jax.device_put(taps), canvas).block_until_ready()

  return {'pil': pil, 'torchvision_host': torchvision_host, 'torchvision_dev': torchvision_dev}


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
    host, dev = np.asarray(rules['torchvision_host']()), np.asarray(rules['torchvision_dev']())
    times = {name: [] for name in rules}
    for _ in range(args.repeats):
      for name, fn in rules.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) for name, t in times.items()}
    results[f'{h}x{w}'] = {
        'seconds': med, 'over_pil': {n: med[n] / med['pil'] for n in med},
        'max_abs_diff_host_vs_dev': float(np.abs(host - dev).max())}
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
