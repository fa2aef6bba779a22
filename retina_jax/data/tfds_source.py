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
"""

import io
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

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

  def __init__(self, name: str, split: str, data_dir: str = ''):
    self.name, self.split = name, split
    self._source, info = _open(name, split, data_dir)
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

  def coco_gt(self, num_images: int = 0) -> dict:
    """pycocotools ground truth (original ids, original pixels, xywh) built from the records.

    Reads the first `num_images` (0: all) records, image headers only (no pixel decoding).
    """
    n = len(self) if num_images <= 0 else min(num_images, len(self))
    images, annotations = [], []
    for i in range(n):
      ex, data, image_id = self._record(i)
      with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
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
