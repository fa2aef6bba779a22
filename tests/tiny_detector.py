"""A tiny detector for the evaluation/export/predict tests: config and random variables.

The variables are drawn with numpy over `jax.eval_shape` of the model's init (well under a
second) instead of running the jitted init; random weights give scores near 0.5, so that every
image has detections above the score threshold.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from retina_jax import config as config_lib
from retina_jax import models
from retina_jax.data.categories import CategoryMap

# Non-contiguous ids on purpose: detections must carry the data set's ids, not labels.
CATEGORIES = CategoryMap(ids=(4, 9, 40), names=('circle', 'square', 'triangle'))


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**overrides) -> dict:
  """os.environ for a child `python -m retina_jax...`: this checkout first on its path."""
  env = dict(os.environ, **overrides)
  env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')])
  return env


def run_workers(tmp_path, script: str, *args: str, devices: int = 1, timeout: int = 120,
                processes: int = 2) -> list[str]:
  """Runs `script` as `processes` CPU processes of one jax.distributed run, each with `devices`
  devices and the arguments (coordinator port, process id, *args); returns their stdouts after
  checking that each exited 0."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  path = tmp_path / 'worker.py'
  path.write_text(script)
  env = subprocess_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                       JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, str(path), str(port), str(i), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  return outs


def tiny_config(image_size: int = 128):
  config = config_lib.get_base_config()
  config.model.backbone = 'tiny'
  config.model.num_classes = CATEGORIES.num_classes
  config.model.norm = 'gn'
  config.model.freeze_at = 0
  config.model.fpn_channels = 16
  config.model.head_channels = 16
  config.model.head_convs = 1
  config.model.dtype = 'float32'
  config.anchors.sizes = (16.0, 32.0, 64.0, 128.0, 256.0)
  config.data.image_size = image_size
  config.data.min_size = image_size
  config.data.max_size = image_size
  config.data.max_boxes = 8
  config.data.num_workers = 1
  config.eval_batch_size = 4
  config.postprocess.pre_nms_topk = 50
  config.postprocess.max_detections = 12
  return config


def random_variables(config, seed: int = 0) -> dict:
  """{'params': ..., 'batch_stats': ...} of numpy arrays with the model's exact tree."""
  model = models.create_model(config)
  size = config.data.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                           dict(shapes))
  variables.setdefault('batch_stats', {})
  return variables


def random_images(n: int, size: int, seed: int = 0):
  """uint8 [n, size, size, 3] padded images and their int32 [n, 2] valid (h, w)."""
  rng = np.random.default_rng(seed)
  hw = rng.integers(size // 2, size + 1, (n, 2)).astype(np.int32)
  images = np.zeros((n, size, size, 3), np.uint8)
  for i, (h, w) in enumerate(hw):
    images[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
  return images, hw


def write_coco_dir(root, split: str = 'val', sizes=((96, 128), (128, 96), (60, 200), (128, 128),
                                                      (200, 70), (100, 100))):
  """A small COCO-layout data set (annotations/instances_<split>.json, <split>/*.png) with the
  CATEGORIES ids, a crowd box and an image without objects; returns its GT dict."""
  import json  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  os.makedirs(os.path.join(root, split), exist_ok=True)
  rng = np.random.default_rng(0)
  images, anns = [], []
  for k, (h, w) in enumerate(sizes):
    image_id = 100 + 7 * k  # Not 0..n-1: ids must be carried, not positions.
    name = f'{image_id}.png'
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3)).astype(np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(os.path.join(root, split, name))
    images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
    if k == len(sizes) - 1:
      continue  # No objects.
    for j in range(1 + k % 3):
      bw, bh = rng.uniform(10, w / 2), rng.uniform(10, h / 2)
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      anns.append({'id': len(anns) + 1, 'image_id': image_id,
                   'category_id': CATEGORIES.ids[(k + j) % 3], 'bbox': [x, y, bw, bh],
                   'area': bw * bh, 'iscrowd': int(k == 1 and j == 1)})
  gt = {'images': images, 'annotations': anns, 'categories': CATEGORIES.to_coco_categories()}
  with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
    json.dump(gt, f)
  return gt


def coco_dir_config(root):
  config = tiny_config()
  config.data.name = 'coco_format'
  config.data.root = str(root)
  config.data.train_split = 'val'
  config.data.eval_split = 'val'
  return config
