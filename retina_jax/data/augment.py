"""Training augmentations: what each example gets (`draw`) and how each is applied; the order in
which they are applied is the body of `retina_jax.data.preprocess.preprocess`.

Every field is under config.data and off by default (the paper's recipe is the horizontal flip
alone, `random_flip`):
  train_min_sizes, train_min_size_sampling   multi-scale training (detectron2's
      ResizeShortestEdge): the shorter side of the resize rule is drawn per example, 'choice'
      from the list or 'range' uniformly from [lo, hi] (integers); the longer side stays capped
      by max_size and the bucket. Empty: config.data.min_size.
  scale_jitter = (lo, hi)                    the resize rule's scale times a factor drawn
      uniformly from [lo, hi] ((0.1, 2.0): large-scale jitter, Ghiasi et al. 2021, as the TF
      Model Garden and torchvision's newer recipes); an image larger than the canvas is cropped
      at a random place, a smaller one padded as always. (1, 1): off.
  crop_min_visible                           after a crop, an object box is kept only when at
      least this share of its area stays inside (boxes are clipped to the crop). Crowd regions
      are clipped and kept while any of them is inside, since a partial crowd region still marks
      anchors to ignore; what a crop drops, objects and crowd regions, is counted per row
      ('cropped_out').
  random_vflip, random_rot90                 vertical flip (p 0.5) and 0-3 counterclockwise
      quarter turns (p 0.25 each) for overhead imagery; a quarter turn swaps height and width,
      so it needs square training canvases (train_buckets='square').
  brightness, contrast, saturation, hue      photometric distortion with torchvision
      ColorJitter's meaning (factors from [1 - x, 1 + x]; hue shift from [-hue, hue] turns),
      applied in that fixed order to the final pixels (PIL's ImageEnhance, as torchvision's PIL
      backend; so only with config.data.resize='pil'). The hue costs most: an HSV round trip
      (its time against the other three: benchmarks/RESULTS.md).

Resume: `draw` is a pure function of (seed, stream position), like the order and the flip (see
`retina_jax.data.sampler`): each example's draw comes from numpy's PCG64 seeded with
(seed, 2, position), and always the same numbers in the same order, so turning one augmentation
on leaves the others' draws as they were.

Boxes in this module are (x1, y1, x2, y2) float32 pixels of the image they are passed with.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance

SAMPLING = ('choice', 'range')


@dataclasses.dataclass(frozen=True)
class Draw:
  """What one training example gets; fixed by (seed, stream position)."""
  min_size: int  # Shorter side for the resize rule.
  jitter: float  # Factor on the resize rule's scale (1: none).
  crop: tuple[float, float]  # (u_y, u_x) in [0, 1): where the crop window sits in the slack.
  vflip: bool
  rot90: int  # Counterclockwise quarter turns of the original image, 0..3.
  brightness: float  # Factors; 1 leaves the image as it is.
  contrast: float
  saturation: float
  hue: float  # Shift of the hue in turns.

  @property
  def photometric(self) -> bool:
    return (self.brightness, self.contrast, self.saturation, self.hue) != (1.0, 1.0, 1.0, 0.0)


def validate(data_config):
  """Raises with the field's name when an augmentation field cannot be drawn from."""
  sizes = tuple(int(s) for s in data_config.train_min_sizes)
  sampling = data_config.train_min_size_sampling
  if sampling not in SAMPLING:
    raise ValueError(f'config.data.train_min_size_sampling must be one of {SAMPLING}, '
                     f'got {sampling!r}.')
  if sizes and (min(sizes) < 1 or (sampling == 'range' and
                                   (len(sizes) != 2 or sizes[0] > sizes[1]))):
    raise ValueError(f'config.data.train_min_sizes={sizes}: positive sides; with sampling '
                     "'range' exactly (lo, hi), lo <= hi.")
  lo, hi = (float(x) for x in data_config.scale_jitter)
  if not 0 < lo <= hi:
    raise ValueError(f'config.data.scale_jitter=({lo}, {hi}) must satisfy 0 < lo <= hi '
                     '((1.0, 1.0) is off).')
  if not 0 <= data_config.crop_min_visible <= 1:
    raise ValueError('config.data.crop_min_visible is a share of the box area in [0, 1], got '
                     f'{data_config.crop_min_visible}.')
  for name in ('brightness', 'contrast', 'saturation'):
    if not 0 <= data_config[name] < 1:
      raise ValueError(f'config.data.{name} must be in [0, 1) (factors from [1 - x, 1 + x]), '
                       f'got {data_config[name]}.')
  if not 0 <= data_config.hue <= 0.5:
    raise ValueError(f'config.data.hue must be in [0, 0.5] turns, got {data_config.hue}.')
  photometric = any(data_config[k] for k in ('brightness', 'contrast', 'saturation', 'hue'))
  if photometric and data_config.get('resize', 'pil') != 'pil':
    raise ValueError('config.data.brightness / contrast / saturation / hue work on uint8 images: '
                     f"they need config.data.resize='pil', not {data_config.resize!r}.")


def enabled(data_config) -> bool:
  """Whether anything beyond the horizontal flip is on (else `draw` is never called)."""
  return bool(tuple(data_config.train_min_sizes) or
              tuple(data_config.scale_jitter) != (1.0, 1.0) or data_config.random_vflip or
              data_config.random_rot90 or data_config.brightness or data_config.contrast or
              data_config.saturation or data_config.hue)


def largest_min_size(data_config) -> int:
  """The largest shorter side the training resize rule can be given (canvases must hold it)."""
  sizes = tuple(int(s) for s in data_config.train_min_sizes)
  return max(sizes) if sizes else int(data_config.min_size)


def draw(data_config, seed: int, position: int) -> Draw:
  """The augmentation of the example at global stream `position` (see the module docstring)."""
  u = np.random.default_rng((seed, 2, position)).random(10)
  sizes = tuple(int(s) for s in data_config.train_min_sizes)
  if not sizes:
    min_size = int(data_config.min_size)
  elif data_config.train_min_size_sampling == 'choice':
    min_size = sizes[min(int(u[0] * len(sizes)), len(sizes) - 1)]
  else:
    min_size = min(sizes[0] + int(u[0] * (sizes[1] - sizes[0] + 1)), sizes[1])
  lo, hi = (float(x) for x in data_config.scale_jitter)

  def factor(x: float, v: float) -> float:
    return 1.0 + x * (2 * v - 1) if x else 1.0

  return Draw(
      min_size=min_size, jitter=lo + (hi - lo) * float(u[1]), crop=(float(u[2]), float(u[3])),
      vflip=bool(data_config.random_vflip) and bool(u[4] < 0.5),
      rot90=min(int(u[5] * 4), 3) if data_config.random_rot90 else 0,
      brightness=factor(data_config.brightness, u[6]),
      contrast=factor(data_config.contrast, u[7]),
      saturation=factor(data_config.saturation, u[8]),
      hue=float(data_config.hue) * (2 * float(u[9]) - 1))


def rot90(image: np.ndarray, boxes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """k counterclockwise quarter turns. image uint8 [H, W, 3]; boxes [n, 4] in its pixels ->
  the turned image ([W, H, 3] for odd k) and its boxes."""
  for _ in range(k % 4):
    w = image.shape[1]
    image = np.rot90(image)  # The top-right corner goes to the top left: (x, y) -> (y, w - x).
    boxes = np.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], axis=1)
  return np.ascontiguousarray(image), boxes


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrored left-right. image [H, W, 3]; boxes [n, 4] in its pixels -> the mirrored image (a
  view) and its boxes."""
  w = image.shape[1]
  return image[:, ::-1], np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]],
                                  axis=1)


def vflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrored top-bottom. image [H, W, 3]; boxes [n, 4] in its pixels -> the mirrored image (a
  view) and its boxes."""
  h = image.shape[0]
  return image[::-1], np.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]],
                               axis=1)


def crop_window(hw: tuple[int, int], canvas: tuple[int, int], u: tuple[float, float]
                ) -> tuple[int, int, int, int]:
  """(y0, x0, h, w) of the part of an hw image that goes into the canvas: all of it where it
  fits, else a canvas-sized window placed at u (in [0, 1)) along each axis's slack."""
  out = []
  for side, limit, v in zip(hw, canvas, u):
    size = min(side, limit)
    out.append((min(int(v * (side - size + 1)), side - size), size))
  (y0, h), (x0, w) = out
  return y0, x0, h, w


def crop_boxes(boxes: np.ndarray, is_crowd: np.ndarray, window: tuple[int, int, int, int],
               min_visible: float) -> tuple[np.ndarray, np.ndarray]:
  """boxes [n, 4] in the uncropped image's pixels -> (boxes [n, 4] in the window's pixels,
  clipped to it; keep bool [n]). An object is kept when at least `min_visible` of its area
  (and some positive area) is inside; a crowd region whenever some positive area is inside."""
  y0, x0, h, w = window
  shifted = boxes - np.asarray([x0, y0, x0, y0], np.float32)
  clipped = np.clip(shifted, 0, np.asarray([w, h, w, h], np.float32))
  cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
  area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
  inside = (cw > 0) & (ch > 0)
  share = np.where(area > 0, cw * ch / np.maximum(area, 1e-12), 0.0)
  keep = inside & (is_crowd | (share >= min_visible))
  return clipped, keep


def photometric(image: np.ndarray, d: Draw) -> np.ndarray:
  """uint8 [H, W, 3] -> the same with brightness, contrast, saturation and hue changed by d's
  factors, as torchvision's ColorJitter on PIL images (blends with black, the mean grey, the
  greyscale image; hue shifted in HSV with wrap-around)."""
  im = Image.fromarray(image)
  for enhance, f in ((ImageEnhance.Brightness, d.brightness), (ImageEnhance.Contrast, d.contrast),
                     (ImageEnhance.Color, d.saturation)):
    if f != 1.0:
      im = enhance(im).enhance(f)
  if d.hue:
    h, s, v = im.convert('HSV').split()
    shift = np.uint8(int(d.hue * 255) % 256)  # Truncated, as torchvision's adjust_hue.
    h = Image.fromarray(np.asarray(h, np.uint8) + shift)  # uint8 addition wraps: a turn.
    im = Image.merge('HSV', (h, s, v)).convert('RGB')
  return np.asarray(im)
