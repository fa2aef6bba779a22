"""The resize rules (config.data.resize): an image's resized size from its size alone, and the
interpolation, including torchvision's bilinear resize reproduced to ATen's arithmetic.

'pil' (the default) resizes the uint8 image with PIL and ships uint8; 'torchvision' is
GeneralizedRCNNTransform's resize, so that converted torchvision weights predict and train
exactly as in torchvision, at 4x the bytes (float32 pixels).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from retina_jax import anchors as anchors_lib


def ceil_multiple(x: int, m: int = anchors_lib.SIZE_MULTIPLE) -> int:
  """x rounded up to a multiple of m (of the stride of C5 by default)."""
  return -(-int(x) // m) * m


def resize_scale(h: int, w: int, min_size: int, max_size: int, image_size: int) -> float:
  """Shorter side to min_size, unless the longer side would pass max_size or the bucket."""
  scale = min_size / min(h, w)
  return min(scale, max_size / max(h, w), image_size / max(h, w))


def resized_hw(h: int, w: int, scale: float, image_size: int) -> tuple[int, int]:
  """(h, w) of the resized image: each side round(side * scale), at least 1 pixel (a 3 x 1000
  image into a 128 bucket would otherwise be 0 pixels high) and at most the bucket."""
  return (min(image_size, max(1, round(h * scale))), min(image_size, max(1, round(w * scale))))


# config.data.resize -> what it does ('pil' is the default and ships 1/4 of the bytes; under
# 'torchvision' converted torchvision weights predict and train exactly as in torchvision).
RESIZE_RULES = {
    'pil': 'scale = min(min_size / shorter side, max_size / longer side, image_size / longer '
           'side); each side min(image_size, max(1, round(side * scale))); PIL bilinear on the '
           'uint8 image; boxes times scale; uint8 images',
    'torchvision': "torchvision's GeneralizedRCNNTransform: scale as for 'pil'; each side "
                   'max(1, int(side * scale)); bilinear interpolation of the float image '
                   '(F.interpolate with recompute_scale_factor=True, align_corners=False, no '
                   'antialias); boxes times the per-axis ratio resized / original; float32 '
                   'images (0..255, normalised on the device)',
}


def resize_geometry(h: int, w: int, min_size: int, max_size: int, image_size: int,
                    rule: str = 'pil') -> tuple[tuple[int, int], tuple[float, float]]:
  """The resize of an h x w image under `rule` (RESIZE_RULES), from its size alone.

  Returns ((nh, nw) resized sides, (sy, sx) float32): box coordinates map as resized =
  original * s per axis, and back as original = resized / s.
  """
  if rule == 'pil':
    scale = resize_scale(h, w, min_size, max_size, image_size)
    return resized_hw(h, w, scale, image_size), (np.float32(scale), np.float32(scale))
  if rule != 'torchvision':
    raise ValueError(f'config.data.resize must be one of {list(RESIZE_RULES)}, got {rule!r}.')
  # The scale in Python floats, as torchvision computes it (min(self_min_size / min_size, ...)),
  # and F.interpolate's output size int(side * scale_factor) in double precision; the bucket
  # term only binds when the bucket is smaller than max_size, where no rule can be torchvision's.
  scale = resize_scale(h, w, min_size, max_size, image_size)
  nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
  return (nh, nw), (np.float32(nh) / np.float32(h), np.float32(nw) / np.float32(w))


def image_dtype(data_config) -> type:
  """dtype of the host batch's 'image': uint8, or float32 under config.data.resize='torchvision'
  (its interpolated pixels are not integers)."""
  return np.float32 if data_config.resize == 'torchvision' else np.uint8


def _linear_taps(in_size: int, out_size: int):
  """ATen's bilinear taps along one axis (align_corners=False, the scale recomputed as
  in_size / out_size in float32): -> (i0, i1 int [out], w0, w1 float32 [out]).

  The source coordinate scale * (dst + 0.5) - 0.5 is rounded to float32 once, as ATen's fused
  multiply-add does (in float64 the product of two float32s is exact); rounding the product
  first moves weights by up to 3e-5 at 1000-pixel sides."""
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int64)
  w1 = np.minimum(src - i0.astype(np.float32), np.float32(1))
  return i0, np.minimum(i0 + 1, in_size - 1), np.float32(1) - w1, w1


@jax.jit
def _interpolate(image: jax.Array, taps) -> jax.Array:
  """uint8 [Hi, Wi, 3] (the original, zero-padded) -> float32 [Ho, Wo, 3]: width then height,
  each output pixel w0 * x[i0] + w1 * x[i1] with the (i0, i1, w0, w1) of `taps` (y, x)."""
  (yi0, yi1, yw0, yw1), (xi0, xi1, xw0, xw1) = taps
  x = image.astype(jnp.float32)
  x = x[:, xi0] * xw0[None, :, None] + x[:, xi1] * xw1[None, :, None]
  return x[yi0] * yw0[:, None, None] + x[yi1] * yw1[:, None, None]


def interpolate_torchvision(image: np.ndarray, hw: tuple[int, int], device) -> jax.Array:
  """torchvision's bilinear resize of uint8 [H, W, 3] to hw = (nh, nw), run by XLA on `device`
  -> float32 [ceil32(nh), ceil32(nw), 3], 0 past the resized sides.

  The original is padded to multiples of 64 and the output to multiples of 32 (taps of weight 0),
  so that one compilation serves every image of the same padded sizes (~0.3 s each on CPU).
  """
  h, w = image.shape[:2]
  padded = np.zeros((ceil_multiple(h, 64), ceil_multiple(w, 64), 3), np.uint8)
  padded[:h, :w] = image
  taps = tuple(tuple(np.pad(t, (0, ceil_multiple(n) - n)) for t in _linear_taps(size, n))
               for size, n in ((h, hw[0]), (w, hw[1])))
  return _interpolate(jax.device_put(padded, device), jax.device_put(taps, device))


@functools.cache
def _host_cpu():
  """XLA's CPU device, where the host pipeline interpolates: faster than numpy's gathers and
  than PIL on uint8 (benchmarks/RESULTS.md, "Resize rules"). The default device when the CPU
  backend is not enabled (JAX_PLATFORMS without cpu). Looked up on first use, not at import,
  so that jax.distributed.initialize can still run first."""
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return jax.local_devices()[0]


def resize_image(image: np.ndarray, hw: tuple[int, int], rule: str = 'pil') -> np.ndarray:
  """uint8 [H, W, 3] -> [nh, nw, 3] as `rule` resizes (see RESIZE_RULES): uint8 for 'pil',
  float32 (pixel values 0..255, not normalised) for 'torchvision'.

  'torchvision' interpolates width then height with ATen's taps and in its order of the
  products, so it equals F.interpolate of the normalised image after normalising (bilinear
  weights sum to 1) to float32 rounding.
  """
  nh, nw = hw
  if rule == 'pil':
    if (nh, nw) == image.shape[:2]:
      return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  return np.asarray(interpolate_torchvision(image, hw, _host_cpu()))[:nh, :nw]


def resize_window(image: np.ndarray, hw: tuple[int, int], window: tuple[int, int, int, int],
                  rule: str = 'pil') -> np.ndarray:
  """The window (y0, x0, h, w) of uint8 [H, W, 3] resized to hw = (nh, nw) by `rule` -> [h, w, 3].

  Under 'pil' a window smaller than the resized image is resized alone, at the window's cost
  (a scale-jittered image cropped into its canvas)."""
  (nh, nw), (y0, x0, ch, cw) = hw, window
  rh, rw = image.shape[:2]
  if rule == 'pil' and (ch, cw) != (nh, nw) and (nh, nw) != (rh, rw):
    return np.asarray(Image.fromarray(image).resize(
        (cw, ch), Image.BILINEAR, box=(x0 * rw / nw, y0 * rh / nh, (x0 + cw) * rw / nw,
                                       (y0 + ch) * rh / nh)))
  return resize_image(image, (nh, nw), rule)[y0:y0 + ch, x0:x0 + cw]
