"""Prediction on single images of any size and mode, in original-image pixels; the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retina_jax import export as export_lib
from retina_jax import inference
from retina_jax import predict as predict_lib
from retina_jax import visualize
from tests import tiny_detector


def test_to_original_coords_divides_by_scale_and_clips():
  dets = {'boxes': np.array([[[10, 20, 50, 60], [-4, -2, 300, 90]]], np.float32),
          'scores': np.array([[0.9, 0.8]], np.float32), 'valid': np.array([[True, True]])}
  out = inference.to_original_coords(dets, np.array([[2.0, 2.0]]), np.array([[40, 100]]))
  np.testing.assert_allclose(out['boxes'], [[[5, 10, 25, 30], [0, 0, 100, 40]]])
  out = inference.to_original_coords(dets, np.array([[4.0, 2.0]]), np.array([[40, 100]]))  # sy, sx
  np.testing.assert_allclose(out['boxes'], [[[5, 5, 25, 15], [0, 0, 100, 22.5]]])
  np.testing.assert_array_equal(out['scores'], dets['scores'])


@pytest.fixture(scope='module')
def detector():
  config = tiny_detector.tiny_config()
  return config, tiny_detector.random_variables(config), inference.make_detect_fn(config)


def _photo(h, w, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def test_detections_in_original_pixels_any_size(detector, tmp_path):
  config, variables, detect = detector
  for h, w in ((70, 150), (300, 97)):  # Up- and down-scaled into the 128 bucket.
    path = tmp_path / f'{h}x{w}.png'
    Image.fromarray(_photo(h, w)).save(path)
    image = predict_lib.load_image(str(path))
    dets = predict_lib.predict(config, variables, image, tiny_detector.CATEGORIES, detect)
    assert 0 < len(dets) <= config.postprocess.max_detections
    scores = [d['score'] for d in dets]
    assert scores == sorted(scores, reverse=True)
    boxes = np.array([d['bbox'] for d in dets])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all()
    assert (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()
    for d in dets:
      assert d['category_id'] == tiny_detector.CATEGORIES.ids[d['label']]
      assert d['category_name'] == tiny_detector.CATEGORIES.names[d['label']]
    if h == 300:  # Scaled back from the 128 px bucket: some box ends below bucket pixel 128.
      assert (boxes[:, 1] + boxes[:, 3]).max() > 128


def test_grayscale_and_rgba_inputs(detector, tmp_path):
  config, variables, detect = detector
  gray = _photo(90, 120)[..., 0]
  Image.fromarray(gray, 'L').save(tmp_path / 'gray.png')
  Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / 'gray_rgb.png')
  rgb = _photo(90, 120, seed=1)
  alpha = np.linspace(0, 255, 120, dtype=np.uint8)[None, :].repeat(90, axis=0)
  Image.fromarray(np.dstack([rgb, alpha]), 'RGBA').save(tmp_path / 'rgba.png')
  Image.fromarray(rgb).save(tmp_path / 'rgb.png')
  run = lambda name: predict_lib.predict(
      config, variables, predict_lib.load_image(str(tmp_path / name)),
      tiny_detector.CATEGORIES, detect)
  assert run('gray.png') == run('gray_rgb.png')
  assert run('rgba.png') == run('rgb.png')  # Alpha dropped, as the data pipeline does.


def test_draw_only_above_threshold():
  image = np.zeros((50, 60, 3), np.uint8)
  pic = visualize.draw_detections(image, [[10, 10, 40, 40], [5, 5, 20, 20]], [0.9, 0.2], [1, 0],
                                  ['a', 'b'], score_threshold=0.5)
  arr = np.asarray(pic)
  assert arr.shape == (50, 60, 3)
  assert arr[25, 40].any()  # Right edge of the kept box.
  assert not arr[12, 5].any()  # Left edge of the dropped one.


@pytest.mark.slow
def test_cli_writes_every_detection_and_a_picture_and_names_a_broken_image(detector, tmp_path):
  config, variables, _ = detector
  export_dir = tmp_path / 'export'
  export_lib.write_export(str(export_dir), config, variables, tiny_detector.CATEGORIES)
  Image.fromarray(_photo(80, 140)).save(tmp_path / 'in.jpg', quality=95)
  env = tiny_detector.subprocess_env()
  proc = subprocess.run(
      [sys.executable, '-m', 'retina_jax.predict', f'--params={export_dir}',
       f'--image={tmp_path / "in.jpg"}', f'--out={tmp_path / "out.png"}',
       f'--json={tmp_path / "out.json"}', '--display_threshold=2.0',
       '--config.postprocess.max_detections=5'],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = json.loads((tmp_path / 'out.json').read_text())
  assert (written['height'], written['width']) == (80, 140)
  # The --config override took effect; the display threshold hid nothing from the JSON.
  assert len(written['detections']) == 5
  assert set(written['detections'][0]) == {'bbox', 'score', 'category_id', 'category_name',
                                           'label'}
  assert {d['category_id'] for d in written['detections']} <= set(tiny_detector.CATEGORIES.ids)
  drawn = np.asarray(Image.open(tmp_path / 'out.png'))
  original = predict_lib.load_image(str(tmp_path / 'in.jpg'))
  np.testing.assert_array_equal(drawn, original)  # Nothing scored >= 2.0: nothing drawn.

  # A broken file: one line naming it and the reason, no traceback, a failing exit status.
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a JPEG')
  proc = subprocess.run(
      [sys.executable, '-m', 'retina_jax.predict', f'--params={export_dir}',
       f'--image={tmp_path / "broken.jpg"}'], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'broken.jpg' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert 'image id' not in proc.stderr


def test_output_paths_are_checked_before_the_detector_runs(tmp_path):
  assert predict_lib.output_problem(str(tmp_path / 'a.png'), str(tmp_path / 'a.json')) == ''
  assert predict_lib.output_problem('', '') == ''
  assert predict_lib.output_problem(str(tmp_path / 'a.JPG'), '') == ''
  assert 'does not exist' in predict_lib.output_problem('', str(tmp_path / 'no' / 'a.json'))
  assert 'does not exist' in predict_lib.output_problem(str(tmp_path / 'no' / 'a.png'), '')
  problem = predict_lib.output_problem(str(tmp_path / 'a.xyz'), '')
  assert problem.startswith('--out=') and '.xyz is not a picture format' in problem
