"""Data set category ids <-> the model's contiguous labels 0..K-1, and their names.

A data set names its classes with its own ids (COCO: 80 ids in 1..90 with gaps; a local
COCO-format file: any ids in any order). Inside the model a class is a contiguous label. The
map is ordered by category id (detectron2's convention), so the same file gives the same labels
whatever order its `categories` list is in. It is saved as JSON next to checkpoints and exported
parameters, so that detections written later use the ids of the data set the model was trained on.
"""

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

# COCO 2017 detection categories, in id order. tfds's coco/2017 label i is the i-th of these
# (tfds takes the label names from the annotation file's `categories`, which is sorted by id).
COCO_2017_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_2017_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')


@dataclasses.dataclass(frozen=True)
class CategoryMap:
  """Label i (contiguous, 0..K-1) is category `ids[i]`, called `names[i]`."""
  ids: tuple[int, ...]
  names: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, 'ids', tuple(int(i) for i in self.ids))
    object.__setattr__(self, 'names', tuple(str(n) for n in self.names))
    if len(self.ids) != len(self.names):
      raise ValueError(f'CategoryMap: {len(self.ids)} ids but {len(self.names)} names.')
    if len(set(self.ids)) != len(self.ids):
      raise ValueError(f'CategoryMap: duplicate category ids in {self.ids}.')
    if not self.ids:
      raise ValueError('CategoryMap: no categories.')

  @property
  def num_classes(self) -> int:
    return len(self.ids)

  @classmethod
  def from_coco_categories(cls, categories: Sequence[dict]) -> 'CategoryMap':
    """From a COCO file's `categories` list ({'id', 'name', ...}), any order; labels by id."""
    cats = sorted(categories, key=lambda c: int(c['id']))
    return cls(ids=tuple(int(c['id']) for c in cats),
               names=tuple(str(c.get('name', c['id'])) for c in cats))

  @classmethod
  def coco_2017(cls) -> 'CategoryMap':
    return cls(ids=COCO_2017_IDS, names=COCO_2017_NAMES)

  def to_coco_categories(self) -> list[dict]:
    return [{'id': i, 'name': n} for i, n in zip(self.ids, self.names)]

  def id_to_label(self, category_ids) -> np.ndarray:
    """Category ids (any int array) -> int32 labels; raises KeyError naming an unknown id."""
    lookup = {c: l for l, c in enumerate(self.ids)}
    category_ids = np.asarray(category_ids)
    try:
      return np.asarray([lookup[int(c)] for c in category_ids.ravel()],
                        np.int32).reshape(category_ids.shape)
    except KeyError as e:
      raise KeyError(f'Category id {e.args[0]} is not one of {self.ids}.') from None

  def label_to_id(self, labels) -> np.ndarray:
    """Labels 0..K-1 (int array, numpy or jax) -> int64 category ids."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f'Labels must be in [0, {self.num_classes}), got '
                       f'[{labels.min()}, {labels.max()}].')
    return np.asarray(self.ids, np.int64)[labels]

  def to_dict(self) -> dict:
    return {'ids': list(self.ids), 'names': list(self.names)}

  @classmethod
  def from_dict(cls, d: dict) -> 'CategoryMap':
    return cls(ids=tuple(d['ids']), names=tuple(d['names']))

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> 'CategoryMap':
    return cls.from_dict(json.loads(text))


def torchvision_coco_v1() -> CategoryMap:
  """torchvision's COCO detection labels: label l is COCO category id l (0..90), with its names.

  torchvision's detection models predict in COCO's 91-id space (index 0 and the 10 unused ids
  are 'N/A' / '__background__'), so for them category_id = label.
  """
  try:
    from torchvision.models import detection  # pylint: disable=g-import-not-at-top
    names = detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta['categories']
  except ImportError:
    names = _TORCHVISION_COCO_NAMES
  return CategoryMap(ids=tuple(range(len(names))), names=tuple(names))


# torchvision.models.detection._meta._COCO_CATEGORIES, for when torchvision is not installed.
_TORCHVISION_COCO_NAMES = (
    '__background__', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'N/A', 'stop sign', 'parking meter',
    'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra',
    'giraffe', 'N/A', 'backpack', 'umbrella', 'N/A', 'N/A', 'handbag', 'tie', 'suitcase',
    'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'N/A', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot',
    'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'N/A',
    'dining table', 'N/A', 'N/A', 'toilet', 'N/A', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'N/A', 'book', 'clock',
    'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')
