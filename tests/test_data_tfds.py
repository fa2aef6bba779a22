"""tfds source, offline: tfds.testing.mock_data serving our own COCO-like records."""

import io

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from retina_jax import config as config_lib
from retina_jax.data import pipeline
from retina_jax.data.categories import CategoryMap


def _jpeg(h, w, seed):
  buf = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buf, 'JPEG')
  return buf.getvalue()


# Records as tfds's coco/2017 stores them: normalised [ymin, xmin, ymax, xmax] boxes.
RECORDS = [
    {'image': _jpeg(40, 80, 0), 'image/id': 139, 'image/filename': '000000000139.jpg',
     'objects': {'bbox': np.asarray([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.25],
                                     [0.5, 0.5, 0.5, 0.75]], np.float32),  # Last: no height.
                 'label': np.asarray([0, 79, 3]), 'is_crowd': np.asarray([False, True, False]),
                 'area': np.asarray([500, 100, 0]), 'id': np.asarray([1, 2, 3])}},
    {'image': _jpeg(64, 32, 1), 'image/id': 285, 'image/filename': '000000000285.jpg',
     'objects': {'bbox': np.zeros((0, 4), np.float32), 'label': np.zeros((0,), np.int64),
                 'is_crowd': np.zeros((0,), bool), 'area': np.zeros((0,), np.int64),
                 'id': np.zeros((0,), np.int64)}},
    {'image': _jpeg(48, 48, 2), 'image/id': 632, 'image/filename': '000000000632.jpg',
     'objects': {'bbox': np.asarray([[0.5, 0.25, 1.0, 0.5]], np.float32),
                 'label': np.asarray([1]), 'is_crowd': np.asarray([False]),
                 'area': np.asarray([0]), 'id': np.asarray([9])}},
]


def _serve(builder, split, decoders=None, **kwargs):
  """Stands in for builder.as_data_source: a list is a random-access data source."""
  del builder, kwargs
  assert split == 'validation'
  assert isinstance(decoders['image'], tfds.decode.SkipDecoding)  # We decode with PIL ourselves.
  return RECORDS


def _config(name='coco/2017'):
  cfg = config_lib.get_base_config().data
  cfg.name = name
  cfg.min_size, cfg.max_size, cfg.image_size, cfg.max_boxes = 64, 128, 128, 4
  cfg.num_workers = 2
  return cfg


def test_coco_records_become_pixel_boxes_with_coco_ids():
  with tfds.testing.mock_data(as_data_source_fn=_serve):
    src = pipeline.create_source(_config(), 'validation')
  assert len(src) == 3
  assert src.categories == CategoryMap.coco_2017()
  ex = src[0]
  assert ex['image'].shape == (40, 80, 3) and ex['image_id'] == 139
  np.testing.assert_allclose(ex['boxes'], [[40, 10, 80, 30], [0, 0, 20, 20]])  # Degenerate gone.
  np.testing.assert_array_equal(ex['labels'], [0, 79])
  np.testing.assert_array_equal(ex['is_crowd'], [False, True])

  gt = src.coco_gt()
  assert [im['id'] for im in gt['images']] == [139, 285, 632]
  assert (gt['images'][1]['height'], gt['images'][1]['width']) == (64, 32)
  anns = gt['annotations']
  assert [a['category_id'] for a in anns] == [1, 90, 2]
  assert anns[0]['bbox'] == [40, 10, 40, 20] and anns[0]['area'] == 500
  assert anns[2]['area'] == 12 * 24  # No area in the record: box area.
  assert [a['iscrowd'] for a in anns] == [0, 1, 0]


def test_eval_batches_over_tfds_on_two_hosts():
  with tfds.testing.mock_data(as_data_source_fn=_serve):
    src = pipeline.create_source(_config(), 'validation')
  cfg = _config()
  ids = []
  for host in range(2):
    for b in pipeline.eval_batches(src, cfg, 2, process_index=host, process_count=2):
      ids += b['image_id'][b['example_valid']].tolist()
      if b['example_valid'][0] and b['image_id'][0] == 139:
        np.testing.assert_allclose(b['boxes'][0, :2], [[64, 16, 128, 48], [0, 0, 32, 32]])
        assert (b['scale'][0] == np.float32(1.6)).all() and b['box_valid'][0].sum() == 2
  assert sorted(ids) == [139, 285, 632]


def test_other_tfds_data_sets_get_ids_from_their_labels():
  def serve_voc(builder, split, decoders=None, **kwargs):
    del builder, split, decoders, kwargs
    objects = {'bbox': np.asarray([[0.0, 0.0, 0.5, 0.5]], np.float32), 'label': np.asarray([14])}
    return [{'image': _jpeg(20, 20, 0), 'objects': objects}]  # No image/id, no is_crowd.

  with tfds.testing.mock_data(as_data_source_fn=serve_voc):
    src = pipeline.create_source(_config('voc/2007'), 'train')
  assert src.categories.num_classes == 20 and src.categories.ids == tuple(range(1, 21))
  assert src.categories.names[14] == 'person'
  ex = src[0]
  assert ex['image_id'] == 0 and not ex['is_crowd'].any()


def test_unprepared_data_set_says_how_to_prepare_it_and_downloads_nothing(tmp_path):
  cfg = _config()
  cfg.tfds_data_dir = str(tmp_path)
  with pytest.raises(RuntimeError, match=r'tfds build coco/2017 --file_format=array_record'):
    pipeline.create_source(cfg, 'validation')
  assert not any(tmp_path.iterdir())  # Nothing downloaded or prepared behind the user's back.


def test_unprepared_data_set_is_not_called_prepared_in_another_format(tmp_path):
  cfg = _config()
  cfg.tfds_data_dir = str(tmp_path)
  with pytest.raises(RuntimeError, match='not prepared') as info:
    pipeline.create_source(cfg, 'train')
  message = str(info.value)
  assert str(tmp_path / 'coco' / '2017') in message
  assert 'tfds build coco/2017 --file_format=array_record' in message
  assert 'delete the data' not in message and 'already prepared' not in message
