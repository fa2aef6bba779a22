"""tfds source, offline: tfds.testing.mock_data serving our own COCO-like records.

The size index is tested on local disk only (it goes through retina_jax.fileio, as gs:// does).
"""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from retina_jax import config as config_lib
from retina_jax.data import pipeline
from retina_jax.data import tfds_source
from retina_jax.data.categories import CategoryMap
from tests import tiny_detector


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


def _records_of(root, split):
  """tfds records of a COCO-layout folder (tiny_detector.write_coco_dir): the same image bytes,
  ids and boxes (normalised [ymin, xmin, ymax, xmax]), in the annotation file's order."""
  gt = json.loads((root / 'annotations' / f'instances_{split}.json').read_text())
  records = []
  for im in gt['images']:
    h, w = im['height'], im['width']
    anns = [a for a in gt['annotations'] if a['image_id'] == im['id']]
    bbox = [[y / h, x / w, (y + bh) / h, (x + bw) / w]
            for x, y, bw, bh in (a['bbox'] for a in anns)]
    records.append({
        'image': (root / split / im['file_name']).read_bytes(), 'image/id': im['id'],
        'objects': {'bbox': np.asarray(bbox, np.float32).reshape(-1, 4),
                    'label': np.zeros(len(anns), np.int64),
                    'is_crowd': np.asarray([bool(a['iscrowd']) for a in anns]),
                    'area': np.asarray([a['area'] for a in anns])}})
  return records


def _tfds_source(records, cfg, split='train'):
  def serve(builder, split, decoders=None, **kwargs):  # pylint: disable=redefined-outer-name
    del builder, decoders, kwargs
    assert split == want
    return records

  want = split

  with tfds.testing.mock_data(as_data_source_fn=serve):
    return pipeline.create_source(cfg, split)


SIZES = ((96, 128), (128, 96), (60, 200), (128, 128), (200, 70), (100, 100), (90, 120))


def test_size_index_is_built_once_from_headers_and_rebuilt_when_stale(tmp_path, monkeypatch,
                                                                     caplog):
  tiny_detector.write_coco_dir(str(tmp_path / 'coco'), split='train', sizes=SIZES)
  records = _records_of(tmp_path / 'coco', 'train')
  cfg = _config()
  cfg.size_index_dir = str(tmp_path / 'index')
  np.testing.assert_array_equal(_tfds_source(records, cfg).original_hw, SIZES)
  index_file = tmp_path / 'index' / 'retina_jax-sizes-train.json'
  index = json.loads(index_file.read_text())
  assert index['key'] == {'name': 'coco/2017', 'version': '1.1.0', 'split': 'train',
                          'num_examples': len(SIZES)}
  assert index['ids'] == [r['image/id'] for r in records]

  def no_headers(data):
    raise AssertionError('an image header was read although the index matches')

  monkeypatch.setattr(tfds_source, '_header_hw', no_headers)
  np.testing.assert_array_equal(_tfds_source(records, cfg).original_hw, SIZES)  # From the file.
  monkeypatch.undo()
  with caplog.at_level(logging.WARNING):  # Another size of the data set: rebuilt.
    np.testing.assert_array_equal(_tfds_source(records[:-1], cfg).original_hw, SIZES[:-1])
  assert 'rebuilding it' in caplog.text
  assert json.loads(index_file.read_text())['key']['num_examples'] == len(SIZES) - 1
  index['key']['version'] = '1.0.0'  # Another version with the same size: rebuilt too.
  index_file.write_text(json.dumps(index))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    np.testing.assert_array_equal(_tfds_source(records, cfg).original_hw, SIZES)
  assert "'version': '1.0.0'" in caplog.text
  index_file.write_text('{"key": ')  # Cut short: rebuilt, not fatal.
  np.testing.assert_array_equal(_tfds_source(records, cfg).original_hw, SIZES)
  assert json.loads(index_file.read_text())['key']['version'] == '1.1.0'


@pytest.mark.parametrize('buckets', ['orientation', 'torchvision'])
def test_tfds_trains_in_the_canvases_of_coco_format_resume_included(tmp_path, buckets, caplog):
  tiny_detector.write_coco_dir(str(tmp_path / 'coco'), split='train', sizes=SIZES)
  cfg = _config()
  cfg.train_buckets, cfg.size_index_dir, cfg.max_boxes = buckets, str(tmp_path / 'index'), 4
  with caplog.at_level(logging.INFO):
    tfds_loader = pipeline.TrainLoader(_tfds_source(_records_of(tmp_path / 'coco', 'train'), cfg),
                                       cfg, 2, seed=0, process_index=0, process_count=1)
  assert f"Training canvases (train_buckets='{buckets}')" in caplog.text
  assert 'square bucket' not in caplog.text
  coco_cfg = cfg.copy_and_resolve_references()
  coco_cfg.name, coco_cfg.root = 'coco_format', str(tmp_path / 'coco')
  coco_loader = pipeline.TrainLoader(pipeline.create_source(coco_cfg, 'train'), coco_cfg, 2,
                                     seed=0, process_index=0, process_count=1)
  assert tfds_loader.canvases == coco_loader.canvases and len(tfds_loader.canvases) > 1
  resumed = tfds_loader.iterate(3)
  canvases = set()
  for step in range(6):
    a, b = tfds_loader.batch(step), coco_loader.batch(step)
    canvases.add(a['image'].shape[1:3])
    for k in ('image', 'image_id', 'image_hw', 'orig_hw', 'scale', 'box_valid', 'is_crowd'):
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{k} at step {step}')
    np.testing.assert_allclose(a['boxes'], b['boxes'], atol=1e-3)
    if step >= 3:
      r = next(resumed)
      for k in a:
        np.testing.assert_array_equal(r[k], a[k], err_msg=f'{k} at resumed step {step}')
  resumed.close()
  assert len(canvases) > 1
