"""--format saved_model: a TF SavedModel that TensorFlow alone serves, with predict's detections
for images of any size (resize, canvas and the way back to original pixels inside).

TensorFlow runs only in child processes: importing torchvision after TensorFlow crashes the
interpreter (triton), and pytest workers import both."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retina_jax import inference
from retina_jax import predict as predict_lib
from tests import tiny_detector

pytestmark = pytest.mark.skipif(importlib.util.find_spec('tensorflow') is None,
                                reason='needs tensorflow')

# Landscape and portrait, downscaled (150x70 with Pillow's vertical pass first), upscaled and left
# as is by the tiny config's resize rule (where the resize in TF is bit-exact: see below).
_SIZES = ((60, 200), (90, 40), (128, 60), (150, 70))

# Bit-exact in both of Pillow 13's pass orders: vertical first where the height shrinks by more
# than twice as many pixels as the width (150x70 -> 128x60: 22 > 2 * 10; 300x60; 1200x500 at
# 600/1000), else horizontal first (1080x608 -> 1000x563: 80 < 2 * 45, and every upscale).
_RESIZE_CHECK = textwrap.dedent('''
  import numpy as np
  import tensorflow as tf
  from PIL import Image
  from retina_jax import saved_model
  from retina_jax.data import resize
  rng = np.random.default_rng(0)
  for h, w, (min_size, max_size) in [
      (60, 200, (96, 128)), (90, 40, (96, 128)), (40, 50, (96, 128)), (480, 640, (800, 1333)),
      (333, 500, (600, 1000)), (37, 1000, (96, 128)), (500, 333, (600, 1000)),
      (150, 70, (96, 128)), (300, 60, (96, 128)), (1200, 500, (600, 1000)),
      (1080, 608, (600, 1000)), (97, 16, (96, 128))]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    scale = resize.resize_scale(h, w, min_size, max_size, 1408)
    nh, nw = resize.resized_hw(h, w, scale, 1408)
    want = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR)).astype(int)
    got = saved_model.pil_resize(tf, tf.constant(image), nh, nw).numpy().astype(int)
    assert np.array_equal(got, want), f'{h}x{w} -> {nh}x{nw}: {np.abs(got - want).max()}'
  print('OK')
''')

_WRITER = textwrap.dedent('''
  import sys
  from retina_jax import saved_model
  from tests import tiny_detector
  config = tiny_detector.tiny_config()
  config.data.min_size = 96  # Orientation canvases 96 x 128 and 128 x 96.
  saved_model.write_saved_model(sys.argv[1], config, tiny_detector.random_variables(config),
                                tiny_detector.CATEGORIES, platforms=('cpu',))
''')

# Runs in a fresh interpreter with TensorFlow and without our package.
_SERVER = textwrap.dedent('''
  import sys
  import numpy as np
  import tensorflow as tf
  model_dir, io_file = sys.argv[1], sys.argv[2]
  serve = tf.saved_model.load(model_dir).signatures['serving_default']
  images = np.load(io_file + '.in.npz')
  out = {}
  for name in images.files:
    for key, value in serve(images=tf.constant(images[name][None])).items():
      out[f'{name}/{key}'] = value.numpy()
  np.savez(io_file + '.out.npz', **out)
  assert not any(m.startswith('retina_jax') for m in sys.modules), 'imported retina_jax'
  print('OK')
''')


def _run(args, env, cwd):
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_pil_resize_in_tensorflow_is_bit_exact(tmp_path):
  _run(['-c', _RESIZE_CHECK], tiny_detector.subprocess_env(), str(tmp_path))


@pytest.mark.parametrize('field,value', [('resize', 'torchvision'),
                                         ('eval_buckets', 'torchvision')])
def test_what_the_saved_model_cannot_do_is_refused_naming_the_field(tmp_path, field, value):
  from retina_jax import saved_model  # pylint: disable=g-import-not-at-top
  config = tiny_detector.tiny_config()
  config.data[field] = value
  with pytest.raises(ValueError, match=rf"config\.data\.{field}='{value}'"):
    saved_model.write_saved_model(str(tmp_path), config, {}, tiny_detector.CATEGORIES)


@pytest.mark.slow
def test_saved_model_serves_predicts_detections_without_our_code(tmp_path):
  out_dir = str(tmp_path / 'saved_model')
  _run(['-c', _WRITER, out_dir], tiny_detector.subprocess_env(), tiny_detector.REPO_ROOT)
  config = tiny_detector.tiny_config()
  config.data.min_size = 96
  variables = tiny_detector.random_variables(config)  # The writer's: the same seed.

  rng = np.random.default_rng(1)
  images = {f'{h}x{w}': rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in _SIZES}
  io_file = str(tmp_path / 'io')
  np.savez(io_file + '.in.npz', **images)
  script = tmp_path / 'server.py'
  script.write_text(_SERVER)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
  env.pop('PYTHONPATH', None)
  _run([str(script), out_dir, io_file], env, str(tmp_path))
  served = dict(np.load(io_file + '.out.npz'))

  detect = inference.make_detect_fn(config)
  for name, image in images.items():
    want = predict_lib.predict(config, variables, image, tiny_detector.CATEGORIES, detect)
    n = int(served[f'{name}/num_detections'][0])
    assert n == len(want) > 0, name
    scores = served[f'{name}/scores'][0]
    np.testing.assert_allclose(scores[:n], [d['score'] for d in want], atol=1e-4, err_msg=name)
    assert not scores[n:].any()
    boxes = served[f'{name}/boxes'][0, :n]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    np.testing.assert_allclose(xywh, [d['bbox'] for d in want], atol=1e-2, err_msg=name)
    np.testing.assert_array_equal(served[f'{name}/category_ids'][0, :n],
                                  [d['category_id'] for d in want], err_msg=name)
    np.testing.assert_array_equal(served[f'{name}/labels'][0, :n], [d['label'] for d in want])
