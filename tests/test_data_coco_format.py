"""coco_format source: validation at start-up, every kind of bad input, and the GT dict."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from retina_jax.data.coco_format import BadImageError, CocoFormatSource

H, W = 30, 40
CATEGORIES = [{'id': 7, 'name': 'seven'}, {'id': 2, 'name': 'two'}]  # Labels: 2 -> 0, 7 -> 1.


def _rgb(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def write_coco(root, files: dict, annotations: list, images: list | None = None, split='train'):
  """files: file name -> encoded bytes (None: not written); images default to one per file."""
  os.makedirs(os.path.join(root, split), exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  for name, data in files.items():
    if data is not None:
      with open(os.path.join(root, split, name), 'wb') as f:
        f.write(data)
  if images is None:
    images = [{'id': k + 1, 'file_name': n, 'width': W, 'height': H} for k, n in enumerate(files)]
  with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': CATEGORIES}, f)
  return str(root)


def _ann(k, image_id, bbox, cat=7, crowd=0):
  return {'id': k, 'image_id': image_id, 'category_id': cat, 'bbox': bbox, 'iscrowd': crowd,
          'area': 10.0}


def test_boxes_are_converted_validated_and_counted(tmp_path):
  anns = [
      _ann(1, 1, [1, 2, 10, 5]),  # Kept: xyxy (1, 2, 11, 7).
      _ann(2, 1, [5, 5, 0, 4]),  # Zero width: dropped.
      _ann(3, 1, [5, 5, 4, -1]),  # Negative height: dropped.
      _ann(4, 1, [-5, 20, 10, 20], cat=2, crowd=1),  # Clipped to (0, 20, 5, 30).
      _ann(5, 1, [50, 0, 5, 5]),  # Entirely outside: dropped.
      _ann(6, 99, [1, 1, 5, 5]),  # Unknown image id: dropped.
  ]
  src = CocoFormatSource(write_coco(tmp_path, {'a.jpg': _encode(Image.fromarray(_rgb()), 'JPEG')},
                                    anns), 'train')
  assert src.stats == {'boxes_non_positive_size': 2, 'boxes_clipped': 1, 'boxes_outside_image': 1,
                       'annotations_unknown_image_id': 1}
  ex = src[0]
  assert ex['image'].shape == (H, W, 3) and ex['image'].dtype == np.uint8
  np.testing.assert_allclose(ex['boxes'], [[1, 2, 11, 7], [0, 20, 5, 30]])
  np.testing.assert_array_equal(ex['labels'], [1, 0])
  np.testing.assert_array_equal(ex['is_crowd'], [False, True])
  assert ex['image_id'] == 1
  np.testing.assert_array_equal(src.object_counts, [2])


def test_coco_gt_loads_in_pycocotools_with_original_ids(tmp_path):
  anns = [_ann(10, 1, [1, 2, 10, 5]), _ann(10, 2, [0, 0, 4, 4], cat=2)]  # Duplicate ann ids.
  files = {'a.jpg': _encode(Image.fromarray(_rgb()), 'JPEG'),
           'b.jpg': _encode(Image.fromarray(_rgb(1)), 'JPEG')}
  src = CocoFormatSource(write_coco(tmp_path, files, anns), 'train')
  gt = src.coco_gt()
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  assert sorted(coco.getCatIds()) == [2, 7]
  assert len(coco.getAnnIds()) == 2  # Renumbered, none lost.
  assert coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]['bbox'] == [1, 2, 10, 5]
  assert coco.loadAnns(coco.getAnnIds(imgIds=[2]))[0]['category_id'] == 2
  assert len(src.coco_gt(num_images=1)['images']) == 1


@pytest.mark.parametrize('kind', ['grayscale', 'cmyk', 'rgba', 'palette', 'png16', 'exif'])
def test_unusual_images_become_rgb_uint8(tmp_path, kind):
  rgb = _rgb()
  if kind == 'grayscale':
    data = _encode(Image.fromarray(rgb[..., 0]), 'PNG')
    expected = np.repeat(rgb[..., :1], 3, axis=2)
  elif kind == 'cmyk':
    data = _encode(Image.fromarray(rgb).convert('CMYK'), 'JPEG', quality=100)
    expected = rgb
  elif kind == 'rgba':
    alpha = np.full((H, W, 1), 7, np.uint8)
    data = _encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2)), 'PNG')
    expected = rgb  # Alpha dropped, colours kept.
  elif kind == 'palette':
    im = Image.fromarray(rgb).quantize(16)
    data = _encode(im, 'PNG')
    expected = np.asarray(im.convert('RGB'))
  elif kind == 'png16':
    g16 = np.random.default_rng(3).integers(0, 65536, (H, W), dtype=np.uint16)
    data = _encode(Image.fromarray(g16), 'PNG')
    expected = np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
  else:  # EXIF orientation 6 (rotate 90 when displayed): ignored, as COCO does.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(rgb), 'JPEG', quality=100, subsampling=0, exif=exif)
    expected = rgb
  src = CocoFormatSource(write_coco(tmp_path, {'x.img': data}, [_ann(1, 1, [1, 1, 5, 5])]),
                         'train')
  image = src[0]['image']
  assert image.shape == (H, W, 3) and image.dtype == np.uint8
  tol = 12 if kind in ('cmyk', 'exif') else 0  # JPEG.
  assert np.abs(image.astype(int) - expected.astype(int)).mean() <= tol


def test_corrupt_truncated_and_resized_images_fail_with_path_and_id(tmp_path):
  good = _encode(Image.fromarray(_rgb()), 'JPEG')
  big = _encode(Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)), 'JPEG')
  files = {'corrupt.jpg': b'this is not a jpeg', 'truncated.jpg': good[:len(good) // 2],
           'wrong_size.jpg': big}
  src = CocoFormatSource(write_coco(tmp_path, files, []), 'train')
  for k, name in enumerate(files):
    with pytest.raises(BadImageError, match=rf'{name}.*image id {k + 1}') as e:
      src[k]
    assert e.value.image_id == k + 1 and e.value.path.endswith(name)



def test_size_mismatch_says_what_to_do_and_spots_exif_rotation(tmp_path):
  # Phone photos: stored W x H with EXIF orientation 6, annotated as displayed (H x W).
  image = Image.fromarray(np.zeros((W, H, 3), np.uint8))  # Stored 40 high, 30 wide.
  exif = image.getexif()
  exif[0x0112] = 6
  rotated = _encode(image, 'JPEG', exif=exif.tobytes())
  plain = _encode(Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)), 'JPEG')
  src = CocoFormatSource(write_coco(tmp_path, {'phone.jpg': rotated, 'other.jpg': plain}, []),
                         'train')
  with pytest.raises(BadImageError, match=r'phone\.jpg.*image id 1.*EXIF orientation 6.*'
                                          r'exif_transpose'):
    src[0]
  with pytest.raises(BadImageError, match=r'other\.jpg.*image id 2.*Correct width/height'):
    src[1]

def test_missing_image_file_stops_at_start_up_or_is_dropped(tmp_path):
  files = {'here.jpg': _encode(Image.fromarray(_rgb()), 'JPEG'), 'gone.jpg': None}
  root = write_coco(tmp_path, files, [_ann(1, 2, [1, 1, 5, 5])])
  with pytest.raises(FileNotFoundError, match=r'gone\.jpg \(id 2\).*skip_bad_images'):
    CocoFormatSource(root, 'train')
  src = CocoFormatSource(root, 'train', skip_bad_images=True)
  assert len(src) == 1 and src.stats['images_missing_file'] == 1
  assert src[0]['image_id'] == 1 and len(src[0]['boxes']) == 0


def test_bad_annotation_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='instances_train.json'):
    CocoFormatSource(str(tmp_path), 'train')
  os.makedirs(tmp_path / 'annotations')
  (tmp_path / 'annotations' / 'instances_train.json').write_text('{"images": [')
  with pytest.raises(ValueError, match='not valid JSON'):
    CocoFormatSource(str(tmp_path), 'train')
  (tmp_path / 'annotations' / 'instances_train.json').write_text('{"images": []}')
  with pytest.raises(ValueError, match="no 'categories'"):
    CocoFormatSource(str(tmp_path), 'train')


@pytest.mark.parametrize('bad, match', [
    ({'bbox': [1, 2, 3]}, 'annotation 1 .*malformed bbox'),
    ({'bbox': [1, 2, 'x', 4]}, 'malformed bbox'),
    ({'bbox': [1, 2, float('nan'), 4]}, 'malformed bbox'),
    ({'category_id': 5}, 'category id 5'),
    ({'category_id': '7'}, "category id '7'"),  # A string looks like a known id unquoted.
])
def test_malformed_annotations_stop_naming_the_annotation(tmp_path, bad, match):
  ann = {**_ann(1, 1, [1, 1, 5, 5]), **bad}
  root = write_coco(tmp_path, {'a.jpg': _encode(Image.fromarray(_rgb()), 'JPEG')}, [ann])
  with pytest.raises(ValueError, match=match):
    CocoFormatSource(root, 'train')


def test_malformed_image_entries(tmp_path):
  data = {'a.jpg': _encode(Image.fromarray(_rgb()), 'JPEG')}
  with pytest.raises(ValueError, match='image id 1 .*width and height'):
    CocoFormatSource(write_coco(tmp_path, data, [], images=[
        {'id': 1, 'file_name': 'a.jpg', 'width': 0, 'height': H}]), 'train')
  with pytest.raises(ValueError, match='image id 1 appears twice'):
    CocoFormatSource(write_coco(tmp_path, data, [], images=[
        {'id': 1, 'file_name': 'a.jpg', 'width': W, 'height': H}] * 2), 'train')


@pytest.mark.parametrize('bad_id', ['abc', '1', 1.5, None])
def test_non_integer_image_id_names_the_file_and_entry(tmp_path, bad_id):
  root = write_coco(tmp_path, {'a.jpg': _encode(Image.fromarray(_rgb()), 'JPEG')}, [], images=[
      {'id': bad_id, 'file_name': 'a.jpg', 'width': W, 'height': H}])
  with pytest.raises(ValueError, match=r"instances_train.json: images\[0\] \(a.jpg\) has id .*"
                                       r"must be integers"):
    CocoFormatSource(root, 'train')
