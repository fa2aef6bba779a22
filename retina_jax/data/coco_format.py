"""A local directory in COCO layout: `annotations/instances_<split>.json` and `<split>/` images.

The annotation file is read and validated once, at start-up, so that nothing fails hours into
training because of it. What is wrong in it is either repaired and counted (the counts are logged
once) or stops construction with a message naming the file and the image or annotation id:

| problem | what happens |
|---|---|
| annotation file missing, not JSON, no `images`/`categories` | error naming the file |
| image entry without integer id / file_name / positive width, height; duplicate id | error |
| annotation with a malformed bbox (not 4 finite numbers) or an unknown category id | error |
| annotation for an image id that is not in `images` | dropped, counted |
| bbox with width or height <= 0 | dropped, counted |
| bbox partly outside the image | clipped to it, counted; dropped if nothing is left |
| image file missing | error listing them (or, with `skip_bad_images`, dropped and counted) |

Images are decoded when read (`load_example`), never at start-up. Their pixel layout is the stored
one: EXIF orientation is ignored, as COCO's own tools and annotations do (the `width`/`height` of
the file and every bbox refer to the stored pixels); a decoded size that disagrees with the file
raises `BadImageError`. Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are
converted to 8-bit RGB. A corrupt or truncated file raises `BadImageError` with path and image id.

Boxes come out as (x1, y1, x2, y2) float32 in original-image pixels (COCO's xywh converted once).
"""

import io
import json
import math
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from retina_jax import fileio
from retina_jax.data.categories import CategoryMap

# A mild guard against decompression bombs that still admits every real photo data set.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class BadImageError(RuntimeError):
  """An image that cannot be read; carries what a user needs to find it."""

  def __init__(self, path: str, image_id: int | None, reason: str):
    which = f' (image id {image_id})' if image_id is not None else ''
    super().__init__(f'Cannot use image {path!r}{which}: {reason}')
    self.path = path
    self.image_id = image_id


def decode_image(data: bytes | str, path: str, image_id: int | None) -> np.ndarray:
  """Encoded image (bytes or a file path, local or gs://) -> uint8 [H, W, 3] RGB in stored
  pixel layout."""
  try:
    if isinstance(data, str):
      data = fileio.Path(data).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Decodes now, so that truncated files fail here and not later.
      if im.mode.startswith('I'):  # 16-bit (I;16*) or 32-bit integer grayscale.
        arr = np.asarray(im).astype(np.int64)
        arr = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
      if im.mode != 'RGB':
        im = im.convert('RGBA' if 'transparency' in im.info else 'RGB').convert('RGB')
      return np.asarray(im, np.uint8)
  except FileNotFoundError:
    raise BadImageError(path, image_id, 'file not found') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL raises UnidentifiedImageError (an OSError) for garbage, OSError for truncated data.
    raise BadImageError(path, image_id, f'{type(e).__name__}: {e}') from None


def _load_json(path: str) -> dict:
  if not fileio.Path(path).is_file():
    raise FileNotFoundError(
        f'COCO annotation file {path!r} not found. A coco_format data set needs '
        f'<root>/annotations/instances_<split>.json and <root>/<split>/ with the images.')
  try:
    data = json.loads(fileio.Path(path).read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'COCO annotation file {path!r} is not valid JSON: {e}') from None
  if not isinstance(data, dict):
    raise ValueError(f'COCO annotation file {path!r}: top level must be an object.')
  for key in ('images', 'categories'):
    if not isinstance(data.get(key), list):
      raise ValueError(f'COCO annotation file {path!r} has no {key!r} list.')
  if not data['categories']:
    raise ValueError(f'COCO annotation file {path!r} has an empty categories list.')
  return data


def _integer(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and v == int(v))


def _positive_int(v) -> bool:
  return _integer(v) and v > 0


class CocoFormatSource:
  """Random access to one split of a COCO-layout directory.

  `source[i]` -> dict: 'image' uint8 [H, W, 3] RGB; 'boxes' float32 [n, 4] (x1, y1, x2, y2)
  original pixels; 'labels' int32 [n] contiguous; 'is_crowd' bool [n]; 'image_id' int.
  Known without decoding: image_ids int64 [N], file_names, original_hw int32 [N, 2] (h, w) from
  the file, object_counts.
  """

  def __init__(self, root: str, split: str, *, skip_bad_images: bool = False):
    self.root = root
    self.split = split
    self.ann_file = str(fileio.Path(root) / 'annotations' / f'instances_{split}.json')
    self.image_dir = str(fileio.Path(root) / split)
    self.skip_bad_images = skip_bad_images
    data = _load_json(self.ann_file)
    self.categories = CategoryMap.from_coco_categories(_checked_categories(data, self.ann_file))
    self.stats: dict[str, int] = {}
    self._read_images(data['images'])
    self._read_annotations(data.get('annotations', []))
    self._drop_missing_files()
    self._log_stats()

  def _count(self, key: str, n: int = 1):
    self.stats[key] = self.stats.get(key, 0) + n

  def _read_images(self, images: list):
    ids, files, hw = [], [], []
    seen = set()
    for k, im in enumerate(images):
      if not isinstance(im, dict) or 'id' not in im or not isinstance(im.get('file_name'), str):
        raise ValueError(f'{self.ann_file}: images[{k}] needs an "id" and a "file_name".')
      if not (_positive_int(im.get('width')) and _positive_int(im.get('height'))):
        raise ValueError(f'{self.ann_file}: image id {im["id"]} ({im["file_name"]}) needs '
                         f'positive integer width and height, got {im.get("width")}, '
                         f'{im.get("height")}.')
      if not _integer(im['id']):
        raise ValueError(f'{self.ann_file}: images[{k}] ({im["file_name"]}) has id {im["id"]!r}; '
                         f'image ids must be integers (COCO results files carry them as such).')
      if im['id'] in seen:
        raise ValueError(f'{self.ann_file}: image id {im["id"]} appears twice.')
      seen.add(im['id'])
      ids.append(int(im['id']))
      files.append(im['file_name'])
      hw.append((int(im['height']), int(im['width'])))
    self.image_ids = np.asarray(ids, np.int64)
    self.file_names = files
    self.original_hw = np.asarray(hw, np.int32).reshape(-1, 2)

  def _read_annotations(self, annotations: list):
    index = {int(i): k for k, i in enumerate(self.image_ids)}
    known_cats = set(self.categories.ids)
    per_image: list[list[tuple]] = [[] for _ in self.file_names]
    for k, ann in enumerate(annotations):
      ann_id = ann.get('id', f'#{k}') if isinstance(ann, dict) else f'#{k}'
      if not isinstance(ann, dict) or 'image_id' not in ann or 'category_id' not in ann:
        raise ValueError(f'{self.ann_file}: annotation {ann_id} needs image_id and category_id.')
      bbox = ann.get('bbox')
      if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
          or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                     and math.isfinite(v) for v in bbox)):
        raise ValueError(f'{self.ann_file}: annotation {ann_id} (image id {ann["image_id"]}) '
                         f'has a malformed bbox {bbox!r}; expected [x, y, width, height].')
      if ann['category_id'] not in known_cats:
        raise ValueError(f'{self.ann_file}: annotation {ann_id} (image id {ann["image_id"]}) '
                         f'has category id {ann["category_id"]!r}, not in categories '
                         f'{self.categories.ids}.')
      k_img = index.get(ann['image_id'])
      if k_img is None:
        self._count('annotations_unknown_image_id')
        continue
      x, y, w, h = (float(v) for v in bbox)
      if w <= 0 or h <= 0:
        self._count('boxes_non_positive_size')
        continue
      img_h, img_w = self.original_hw[k_img]
      x1, y1 = min(max(x, 0.0), img_w), min(max(y, 0.0), img_h)
      x2, y2 = min(max(x + w, 0.0), img_w), min(max(y + h, 0.0), img_h)
      if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        if x2 <= x1 or y2 <= y1:
          self._count('boxes_outside_image')
          continue
        self._count('boxes_clipped')
      area = ann.get('area')
      area = float(area) if isinstance(area, (int, float)) and area > 0 else w * h
      per_image[k_img].append((x1, y1, x2, y2, ann['category_id'], bool(ann.get('iscrowd', 0)),
                               area))
    self._boxes, self._labels, self._crowd, self._area = [], [], [], []
    for anns in per_image:
      self._boxes.append(np.asarray([a[:4] for a in anns], np.float32).reshape(-1, 4))
      self._labels.append(self.categories.id_to_label([a[4] for a in anns]).astype(np.int32))
      self._crowd.append(np.asarray([a[5] for a in anns], bool))
      self._area.append(np.asarray([a[6] for a in anns], np.float64))

  def _drop_missing_files(self):
    missing = _missing_files(self.image_dir, self.file_names)
    if not missing:
      return
    listed = ', '.join(f'{self._image_path(k)} (id '
                       f'{self.image_ids[k]})' for k in missing[:5])
    if not self.skip_bad_images:
      raise FileNotFoundError(
          f'{len(missing)} image file(s) of {self.ann_file} are missing, e.g. {listed}. '
          f'Set config.data.skip_bad_images=True to train without them.')
    logging.warning('Dropping %d images whose files are missing, e.g. %s', len(missing), listed)
    self._count('images_missing_file', len(missing))
    keep = np.setdiff1d(np.arange(len(self.file_names)), missing)
    self.image_ids, self.original_hw = self.image_ids[keep], self.original_hw[keep]
    for name in ('file_names', '_boxes', '_labels', '_crowd', '_area'):
      values = getattr(self, name)
      setattr(self, name, [values[k] for k in keep])

  def _log_stats(self):
    logging.info('%s: %d images, %d objects, %d categories; repaired/dropped: %s',
                 self.ann_file, len(self), int(self.object_counts.sum()),
                 self.categories.num_classes, self.stats or 'nothing')

  def __len__(self) -> int:
    return len(self.file_names)

  @property
  def object_counts(self) -> np.ndarray:
    """int [N]: annotations per image (crowd regions included), known without decoding."""
    return np.asarray([len(b) for b in self._boxes], np.int64)

  def _image_path(self, i: int) -> str:
    return str(fileio.Path(self.image_dir) / self.file_names[i])

  def __getitem__(self, i: int) -> dict[str, Any]:
    path = self._image_path(i)
    image_id = int(self.image_ids[i])
    image = decode_image(path, path, image_id)
    file_hw = tuple(int(v) for v in self.original_hw[i])
    if image.shape[:2] != file_hw:
      raise BadImageError(path, image_id, _size_mismatch(path, image.shape[:2], file_hw))
    return {'image': image, 'boxes': self._boxes[i], 'labels': self._labels[i],
            'is_crowd': self._crowd[i], 'image_id': image_id, 'path': path}

  def coco_gt(self, num_images: int = 0) -> dict:
    """pycocotools ground truth of the first `num_images` (0: all) images, as the pipeline sees it.

    Original category ids and original pixels (xywh); boxes are the validated ones (clipped,
    degenerate ones dropped), areas are the file's own (COCO's area ranges use them); annotation
    ids are renumbered 1..M because files do not always have unique ones.
    """
    n = len(self) if num_images <= 0 else min(num_images, len(self))
    images, annotations = [], []
    for k in range(n):
      h, w = (int(v) for v in self.original_hw[k])
      images.append({'id': int(self.image_ids[k]), 'file_name': self.file_names[k],
                     'height': h, 'width': w})
      cat_ids = self.categories.label_to_id(self._labels[k])
      for j, (x1, y1, x2, y2) in enumerate(self._boxes[k].tolist()):
        annotations.append({
            'id': len(annotations) + 1, 'image_id': int(self.image_ids[k]),
            'category_id': int(cat_ids[j]), 'bbox': [x1, y1, x2 - x1, y2 - y1],
            'area': float(self._area[k][j]), 'iscrowd': int(self._crowd[k][j])})
    return {'images': images, 'annotations': annotations,
            'categories': self.categories.to_coco_categories()}


def _size_mismatch(path: str, decoded_hw: tuple[int, int], file_hw: tuple[int, int]) -> str:
  """Why a decoded image does not fit its annotation entry, and what to do about it."""
  reason = f'decoded size (h, w) {decoded_hw} differs from the annotation file\'s {file_hw}'
  try:
    with Image.open(io.BytesIO(fileio.Path(path).read_bytes())) as im:
      orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation.
  except OSError:
    orientation = 1
  if orientation in (5, 6, 7, 8) and tuple(decoded_hw[::-1]) == file_hw:
    return (f'{reason}: its EXIF orientation {orientation} turns it by 90 degrees, so the '
            'annotations describe the displayed image, while images are read in their stored '
            'pixel layout (as COCO\'s are). Write the images with the rotation applied '
            '(PIL.ImageOps.exif_transpose) and the annotations fit.')
  return (f'{reason}. Correct width/height (and the boxes) in the annotation file or replace '
          'the image.')


def _missing_files(image_dir: str, file_names: list[str]) -> list[int]:
  """Positions of the `file_names` that are not files under `image_dir`.

  One listing of the folder instead of a request per image (118k of them for COCO train on
  gs://); names with a sub-folder are looked up one by one.
  """
  folder = fileio.Path(image_dir)
  listed = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
  return [k for k, name in enumerate(file_names)
          if not (name in listed if '/' not in name else (folder / name).is_file())]


def read_categories(root: str, split: str) -> CategoryMap:
  """The categories of `<root>/annotations/instances_<split>.json` (checked as the source does),
  without reading the images: experiment files take the number of classes from it."""
  path = str(fileio.Path(root) / 'annotations' / f'instances_{split}.json')
  return CategoryMap.from_coco_categories(_checked_categories(_load_json(path), path))


def _checked_categories(data: dict, path: str) -> list[dict]:
  for k, c in enumerate(data['categories']):
    if not isinstance(c, dict) or not isinstance(c.get('id'), int) or isinstance(c['id'], bool):
      raise ValueError(f'{path}: categories[{k}] needs an integer "id", got {c!r}.')
  ids = [c['id'] for c in data['categories']]
  if len(set(ids)) != len(ids):
    raise ValueError(f'{path}: duplicate category ids in {sorted(ids)}.')
  return data['categories']
