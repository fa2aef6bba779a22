""""shapes": a deterministic synthetic detection data set, written once in COCO layout.

Made for the demo and for tests: no download, generated in seconds, read through exactly the same
coco_format path as real data. Yet it is not trivial, so that focal loss vs cross entropy and
anchor choices make a measurable difference:
- five classes of coloured shapes (ids 1, 3, 7, 12, 20: non-contiguous, listed out of order in the
  file, so the id <-> label map is always exercised); object colours are random, so the class is
  in the outline, not the colour;
- objects from small (12 px) to most of the image, log-uniform in size; rectangles, ellipses and
  triangles with aspect ratios up to 1:3 / 3:1;
- textured backgrounds (gradients, stripes, noise) with unannotated clutter (jagged splats and
  lines) that look like objects to an untrained detector: many easy and some hard negatives;
- objects overlapping (IoU up to 0.35, the later one drawn on top, hiding under half the other), crowd regions (a swarm of tiny
  shapes of one class annotated by one `iscrowd` box), about 5% images without objects, and
  square and non-square images of 128-192 px.

Image k of a split depends only on (seed, split, k), so every host and every rerun writes the same
files. Boxes are exact: a shape drawn over pixels [x1, x2) x [y1, y2) has bbox [x1, y1, x2 - x1,
y2 - y1]; areas are box areas.
"""

import concurrent.futures
import hashlib
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from retina_jax import fileio

# (id, name): readable names, non-contiguous ids, written to the file in this (unsorted) order.
CATEGORIES = ((20, 'ring'), (1, 'ellipse'), (12, 'cross'), (3, 'rectangle'), (7, 'triangle'))
SPLITS = ('train', 'validation')
IMAGE_SIZES = ((128, 128), (160, 160), (192, 192), (128, 192), (192, 128), (144, 192),
               (192, 144))  # (h, w)
_VERSION = 4  # Bump when the generator changes, so that stale caches are not reused.


def default_cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'retina_jax')


def dataset_dir(root: str, num_train: int, num_eval: int, seed: int) -> str:
  """<root or ~/.cache/retina_jax>/shapes-<hash of the generation parameters> (root may be
  gs://...)."""
  params = json.dumps({'version': _VERSION, 'num_train': num_train, 'num_eval': num_eval,
                       'seed': seed, 'sizes': IMAGE_SIZES, 'categories': CATEGORIES},
                      sort_keys=True)
  digest = hashlib.sha1(params.encode()).hexdigest()[:10]
  return str(fileio.Path(root or default_cache_dir()) / f'shapes-{digest}')


def ensure_shapes(root: str, num_train: int, num_eval: int, seed: int) -> str:
  """Writes the data set unless it is already there; returns its COCO-layout directory.

  Published with `fileio.publish_dir`, so that a crash never leaves a data set that counts as
  written, and concurrent writers (several processes or hosts) write the same files.
  """
  final = dataset_dir(root, num_train, num_eval, seed)
  if not fileio.is_complete(final):
    def build(local: str):
      os.makedirs(os.path.join(local, 'annotations'))
      for split, n in zip(SPLITS, (num_train, num_eval)):
        write_split(local, split, n, seed)
    fileio.publish_dir(build, final)
  return final


def write_split(root: str, split: str, num_images: int, seed: int):
  """Writes <root>/<split>/*.jpg and <root>/annotations/instances_<split>.json."""
  os.makedirs(os.path.join(root, split), exist_ok=True)
  split_tag = SPLITS.index(split) if split in SPLITS else len(SPLITS)

  def write_image(k: int):
    pixels, objects = render_image(np.random.default_rng([seed, split_tag, k]))
    Image.fromarray(pixels).save(os.path.join(root, split, f'{k + 1:06d}.jpg'), quality=90)
    return pixels.shape[:2], objects

  # Threads: numpy, drawing and JPEG encoding release the GIL for most of their time.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    rendered = list(pool.map(write_image, range(num_images)))
  images, annotations = [], []
  for k, ((h, w), objects) in enumerate(rendered):
    image_id = k + 1  # COCO-style positive ids.
    images.append({'id': image_id, 'file_name': f'{image_id:06d}.jpg', 'height': h, 'width': w})
    for (x1, y1, x2, y2), cat_id, crowd in objects:
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id, 'category_id': cat_id,
          'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
          'iscrowd': int(crowd)})
  categories = [{'id': i, 'name': n, 'supercategory': 'shape'} for i, n in CATEGORIES]
  with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
    json.dump({'info': {'description': f'retina_jax shapes, seed {seed}'},
               'images': images, 'annotations': annotations, 'categories': categories}, f)


def _background(rng, h: int, w: int) -> np.ndarray:
  """float32 [h, w, 3]: a tinted gradient, optional stripes, and noise; low saturation.

  Built from separable 1-D terms (sin(a + b) = sin a cos b + cos a sin b), which keeps the
  generation of thousands of images to seconds.
  """
  ys = np.arange(h, dtype=np.float32)[:, None]
  xs = np.arange(w, dtype=np.float32)[None, :]
  base = rng.uniform(60, 200, 3).astype(np.float32) + rng.uniform(-25, 25, 3).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  img = ((np.cos(angle) * xs + np.sin(angle) * ys) * (rng.uniform(-60, 60) / max(h, w)))
  if rng.random() < 0.6:
    k = 2 * np.pi / rng.uniform(6, 30)
    a2 = rng.uniform(0, np.pi)
    kx, ky = k * np.cos(a2) * xs, k * np.sin(a2) * ys
    stripes = np.sin(kx) * np.cos(ky) + np.cos(kx) * np.sin(ky)
    img = img + stripes * rng.uniform(5, 30)
  noise = rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(3, 15)
  return (img + noise)[..., None] + base


def _colour(rng) -> tuple[int, int, int]:
  """A saturated random colour (backgrounds are greyish, so objects usually stand out)."""
  c = rng.uniform(0, 255, 3)
  c[rng.integers(3)] = rng.uniform(0, 60)
  c[rng.integers(3)] = rng.uniform(195, 255)
  return tuple(int(v) for v in c)


def _draw_shape(draw: ImageDraw.ImageDraw, rng, cat_name: str, box, fill):
  """Draws over the pixels [x1, x2) x [y1, y2), touching all four sides of the box."""
  x1, y1, x2, y2 = box
  x2, y2 = x2 - 1, y2 - 1  # PIL's shape boxes include their last pixel.
  w, h = x2 - x1, y2 - y1
  if cat_name == 'ellipse':
    draw.ellipse((x1, y1, x2, y2), fill=fill)
  elif cat_name == 'rectangle':
    draw.rectangle((x1, y1, x2, y2), fill=fill)
  elif cat_name == 'ring':
    draw.ellipse((x1, y1, x2, y2), outline=fill, width=max(1, int(min(w, h) * 0.2)))
  elif cat_name == 'triangle':
    apex = x1 + int(round(rng.uniform(0, 1) * w))
    if rng.random() < 0.5:
      draw.polygon(((x1, y2), (x2, y2), (apex, y1)), fill=fill)
    else:
      draw.polygon(((x1, y1), (x2, y1), (apex, y2)), fill=fill)
  elif cat_name == 'cross':
    tx, ty = max(1, w // 3), max(1, h // 3)
    cx, cy = x1 + w // 2, y1 + h // 2
    draw.rectangle((cx - tx // 2, y1, cx - tx // 2 + tx, y2), fill=fill)
    draw.rectangle((x1, cy - ty // 2, x2, cy - ty // 2 + ty), fill=fill)
  else:
    raise ValueError(cat_name)


def _overlap_ok(new, old) -> bool:
  """IoU < 0.35, and the new (drawn on top) object hides less than half of the old one."""
  iw = max(0, min(new[2], old[2]) - max(new[0], old[0]))
  ih = max(0, min(new[3], old[3]) - max(new[1], old[1]))
  inter = iw * ih
  area_new = (new[2] - new[0]) * (new[3] - new[1])
  area_old = (old[2] - old[0]) * (old[3] - old[1])
  return inter < 0.35 * (area_new + area_old - inter) and inter < 0.5 * area_old


def _clutter(draw, rng, h: int, w: int):
  """Unannotated splats and lines: negatives that look a bit like objects.

  Splats are jagged stars (many vertices, alternating inner and outer radii): a random polygon
  with few vertices is often a triangle or a quadrilateral, i.e. an unannotated object of a
  real class, which would teach the detector that triangles are background.
  """
  for _ in range(rng.integers(0, 6)):
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 0.15 * min(h, w))
    n = 2 * int(rng.integers(5, 9))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
    radii = r * np.where(np.arange(n) % 2 == 0, rng.uniform(0.85, 1.0, n),
                         rng.uniform(0.3, 0.5, n))
    draw.polygon([(float(cx + q * np.cos(a)), float(cy + q * np.sin(a)))
                  for a, q in zip(angles, radii)], fill=_colour(rng))
  for _ in range(rng.integers(0, 4)):
    draw.line([tuple(rng.uniform(0, (w, h))) for _ in range(2)], fill=_colour(rng),
              width=int(rng.integers(1, 4)))


def render_image(rng) -> tuple[np.ndarray, list]:
  """-> (uint8 [h, w, 3], [((x1, y1, x2, y2) int pixels, category id, is_crowd), ...])."""
  h, w = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
  image = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  _clutter(draw, rng, h, w)
  objects = []
  if rng.random() < 0.12:  # A crowd region: a swarm of tiny shapes of one class.
    cat_id, cat_name = CATEGORIES[rng.integers(len(CATEGORIES))]
    cw, ch = int(rng.uniform(0.3, 0.6) * w), int(rng.uniform(0.3, 0.6) * h)
    cx1, cy1 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    fill = _colour(rng)
    for _ in range(rng.integers(12, 30)):
      s = int(rng.integers(3, 7))
      x, y = int(rng.integers(cx1, cx1 + cw - s + 1)), int(rng.integers(cy1, cy1 + ch - s + 1))
      _draw_shape(draw, rng, cat_name, (x, y, x + s, y + s), fill)
    objects.append(((cx1, cy1, cx1 + cw, cy1 + ch), cat_id, True))
  num_objects = 0 if rng.random() < 0.05 else int(rng.integers(1, 9))
  min_side, max_side = 12.0, 0.7 * min(h, w)
  for _ in range(num_objects):
    for _ in range(10):  # Rejection sampling for bounded overlap.
      cat_id, cat_name = CATEGORIES[rng.integers(len(CATEGORIES))]
      size = np.exp(rng.uniform(np.log(min_side), np.log(max_side)))
      aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3))) if cat_name in (
          'rectangle', 'ellipse', 'triangle') else np.exp(rng.uniform(-0.2, 0.2))
      bw = int(np.clip(round(size / np.sqrt(aspect)), 4, w))
      bh = int(np.clip(round(size * np.sqrt(aspect)), 4, h))
      x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
      box = (x1, y1, x1 + bw, y1 + bh)
      if all(_overlap_ok(box, o[0]) for o in objects if not o[2]):
        _draw_shape(draw, rng, cat_name, box, _colour(rng))
        objects.append((box, cat_id, False))
        break
  return np.asarray(image), objects
