"""A tfds detection data set (coco/2017 or any with the same features), read by random access.

`tfds.data_source` opens the prepared array_record files; a host reads only the records the
pipeline asks it for (its rows of each global batch), never the whole split. Features used, as in
tfds's coco/2017: 'image' (kept encoded: decoded with PIL in the pipeline's worker threads),
'image/id', 'objects/bbox' (normalised [ymin, xmin, ymax, xmax]), 'objects/label' (contiguous in
tfds order), 'objects/is_crowd' (optional: False when a data set lacks it), 'objects/area'
(optional, for COCO's area ranges).

For tfds's COCO (80 classes) tfds label i is COCO category `COCO_2017_IDS[i]`: tfds takes its
label names from the annotation file's categories, which are sorted by id. Other data sets get
ids 1..K in tfds order, named by their ClassLabel.

Unlike the coco_format path there is no start-up pass over the annotations (that would read every
record of the split); boxes with no area after conversion are dropped when an example is read.

Image sizes (`original_hw`, which the orientation and torchvision training canvases group by)
come from a size index of the split, (image id, height, width) per record read from the image
headers (no pixel is decoded), built once on first use and kept as
`retina_jax-sizes-<split>.json` beside the prepared data, or in config.data.size_index_dir
(local or gs://; e.g. the workdir, when the data's folder is read-only). It records the data
set's name, version, split and size, and is rebuilt when any of them has changed.
"""

import concurrent.futures
import functools
import io
import json
import re
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from retina_jax import fileio
from retina_jax.data.categories import COCO_2017_NAMES, CategoryMap
from retina_jax.data.coco_format import decode_image


def _open(name: str, split: str, data_dir: str):
  import tensorflow_datasets as tfds  # Heavy (imports TensorFlow); only tfds users pay for it.
  try:
    # download=False: preparing COCO is a separate, one-off step, never something every host of
    # a pod starts on its own at the beginning of training.
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                              decoders={'image': tfds.decode.SkipDecoding()})
    info = getattr(source, 'dataset_info', None) or tfds.builder(
        name, data_dir=data_dir or None).info
  except Exception as e:  # tfds raises many kinds (not found, wrong file format, bad split).
    where = f' --data_dir={data_dir}' if data_dir else ''
    missing = _missing_data_path(tfds, name, data_dir)
    # For data never prepared, tfds says it is "already prepared ... in the TFRECORD format"
    # and suggests deleting it: say what is true instead.
    why = (f'it is not prepared: nothing at {missing}' if missing else
           f'{type(e).__name__}: {e}')
    raise RuntimeError(
        f'Cannot open tfds data set {name!r}, split {split!r} (data_dir '
        f'{data_dir or "tfds default"}) as a random-access data source: {why}\n'
        f'It must be prepared once in array_record format, e.g. '
        f'`tfds build {name} --file_format=array_record{where}` (COCO: put the downloaded '
        f'archives in the manual dir if this machine cannot download them).') from e
  return source, info


def _missing_data_path(tfds, name: str, data_dir: str) -> str:
  """Where tfds would keep the prepared `name` if nothing is there, else '' (also when the name
  is unknown: tfds's own error says that best)."""
  try:
    path = tfds.builder(name, data_dir=data_dir or None).data_path
    return '' if path.exists() else str(path)
  except Exception:  # pylint: disable=broad-except
    return ''


def _size_index_path(folder: str, split: str) -> str:
  """The size index of `split` in `folder`; a split such as 'train[:10%]' named in safe
  characters (the index records the exact split)."""
  safe = re.sub(r'[^A-Za-z0-9_.-]', '_', split)
  return str(fileio.Path(folder) / f'retina_jax-sizes-{safe}.json')


def _header_hw(data: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image, from its header (the pixels are not decoded)."""
  with Image.open(io.BytesIO(data)) as im:
    w, h = im.size
  return h, w


def _category_map(name: str, info) -> CategoryMap:
  label = info.features['objects']['label']
  names = tuple(label.names)
  is_coco = names == COCO_2017_NAMES or (name.split('/')[0] == 'coco' and len(names) == 80)
  if is_coco:
    return CategoryMap.coco_2017()
  return CategoryMap(ids=tuple(range(1, len(names) + 1)), names=names)


class TfdsSource:
  """Random access to one split of a tfds detection data set.

  `source[i]` -> dict: 'image' uint8 [H, W, 3] RGB; 'boxes' float32 [n, 4] (x1, y1, x2, y2)
  original pixels; 'labels' int32 [n] contiguous (tfds labels); 'is_crowd' bool [n];
  'image_id' int.
  """

  object_counts = None  # Unknown without reading every record.

  def __init__(self, name: str, split: str, data_dir: str = '', *, size_index_dir: str = '',
               num_workers: int = 4):
    self.name, self.split = name, split
    self._source, info = _open(name, split, data_dir)
    self._info = info
    self._size_index_dir = size_index_dir
    self._num_workers = max(1, int(num_workers))
    self.categories = _category_map(name, info)
    self.stats: dict[str, int] = {}
    logging.info('tfds %s[%s]: %d examples, %d categories', name, split, len(self),
                 self.categories.num_classes)

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, i: int) -> str:
    return f'tfds:{self.name}/{self.split}[{i}]'

  def _record(self, i: int) -> tuple[dict, bytes, int]:
    ex = self._source[int(i)]
    image_id = int(ex['image/id']) if 'image/id' in ex else int(i)
    data = ex['image']
    return ex, data if isinstance(data, bytes) else bytes(data), image_id

  @staticmethod
  def _annotations(objects: dict, h: int, w: int):
    """objects/bbox [n, 4] normalised (ymin, xmin, ymax, xmax) -> float32 [n, 4] xyxy pixels."""
    bbox = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
    n = len(bbox)
    boxes = np.clip(bbox[:, [1, 0, 3, 2]], 0.0, 1.0) * np.asarray([w, h, w, h], np.float32)
    labels = np.asarray(objects['label'], np.int32).reshape(-1)[:n]
    crowd = np.asarray(objects.get('is_crowd', np.zeros(n, bool)), bool).reshape(-1)[:n]
    area = np.asarray(objects.get('area', np.zeros(n)), np.float64).reshape(-1)[:n]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep], crowd[keep], area[keep], int((~keep).sum())

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex, data, image_id = self._record(i)
    image = decode_image(data, self._where(i), image_id)
    h, w = image.shape[:2]
    boxes, labels, crowd, _, dropped = self._annotations(ex['objects'], h, w)
    if dropped:
      logging.log_every_n(logging.WARNING, '%s (image id %d): dropped %d boxes with no area',
                          100, self._where(i), image_id, dropped)
    return {'image': image, 'boxes': boxes, 'labels': labels, 'is_crowd': crowd,
            'image_id': image_id, 'path': self._where(i)}

  def _id_hw(self, i: int) -> tuple[int, int, int]:
    """(image id, height, width) of record i."""
    _, data, image_id = self._record(i)
    return (image_id, *_header_hw(data))

  @functools.cached_property
  def original_hw(self) -> np.ndarray:
    """int32 [N, 2] (h, w) of every record's image, from the size index (see the module
    docstring): read when it matches this data set, else built from the image headers and kept."""
    path = _size_index_path(self._size_index_dir or str(self._info.data_dir), self.split)
    key = {'name': self.name, 'version': str(self._info.version), 'split': self.split,
           'num_examples': len(self)}
    try:
      index = json.loads(fileio.Path(path).read_text()) if fileio.Path(path).exists() else None
    except (OSError, ValueError) as e:  # Unreadable or cut short: rebuilt like a stale one.
      logging.warning('Size index %s unreadable (%s): rebuilding it.', path, e)
      index = None
    if index is not None and index.get('key') == key:
      logging.info('tfds %s[%s]: image sizes from %s.', self.name, self.split, path)
      return np.asarray(index['hw'], np.int32).reshape(-1, 2)
    if index is not None:
      logging.warning('Size index %s is for %s, not %s: rebuilding it.', path, index.get('key'),
                      key)
    logging.info('tfds %s[%s]: reading the image headers of %d records for the size index '
                 '(once: it is kept at %s).', self.name, self.split, len(self), path)
    with concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
      rows = list(pool.map(self._id_hw, range(len(self)), chunksize=256))
    ids = [r[0] for r in rows]
    hw = [[r[1], r[2]] for r in rows]
    try:
      fileio.Path(path).parent.mkdir(parents=True, exist_ok=True)
      fileio.write_atomic(path, json.dumps({'key': key, 'ids': ids, 'hw': hw},
                                           separators=(',', ':')))
    except OSError as e:  # A read-only data folder: this run has the sizes; the next rebuilds.
      logging.warning('Could not keep the size index at %s (%s); the next start will read the '
                      'image headers again. Set config.data.size_index_dir to a writable folder '
                      '(e.g. the workdir) to keep it.', path, e)
    return np.asarray(hw, np.int32).reshape(-1, 2)

  def coco_gt(self, num_images: int = 0) -> dict:
    """pycocotools ground truth (original ids, original pixels, xywh) built from the records.

    Reads the first `num_images` (0: all) records, image headers only (no pixel decoding).
    """
    n = len(self) if num_images <= 0 else min(num_images, len(self))
    images, annotations = [], []
    for i in range(n):
      ex, data, image_id = self._record(i)
      h, w = _header_hw(data)
      images.append({'id': image_id, 'file_name': self._where(i), 'height': h, 'width': w})
      boxes, labels, crowd, area, _ = self._annotations(ex['objects'], h, w)
      cat_ids = self.categories.label_to_id(labels)
      for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        annotations.append({
            'id': len(annotations) + 1, 'image_id': image_id, 'category_id': int(cat_ids[j]),
            'bbox': [x1, y1, x2 - x1, y2 - y1],
            'area': float(area[j]) if area[j] > 0 else (x2 - x1) * (y2 - y1),
            'iscrowd': int(crowd[j])})
    return {'images': images, 'annotations': annotations,
            'categories': self.categories.to_coco_categories()}
