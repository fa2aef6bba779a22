"""Converted torchvision weights under experiments/torchvision_compat.py give torchvision's own
outputs on images it resizes (up, down past the max_size cap, portrait, odd sizes): through
`predict --json`, through `evaluate` on a COCO-format folder, and in a training step (losses,
gradients, SGD update). torchvision's model with its own GeneralizedRCNNTransform is the oracle.

A ResNet-18 RetinaNet with 64-channel FPN and heads at min_size 128 / max_size 200 keeps every
torchvision forward and our compiles small; the conventions checked are those of any size.
Not covered: R50 at 800 / 1333 (only its conversion, in test_convert.py), and torchvision's
batch padding in our input pipeline: the training test pads its batch to the batch's largest
sides itself, since TrainLoader's train_buckets='torchvision' batches images of one canvas
(each image's resized sides rounded up to 32) instead of padding to the batch's largest.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip('torch', reason='torch is needed for the torchvision reference tests')

from retina_jax import config as config_lib  # pylint: disable=wrong-import-position
from retina_jax import convert  # pylint: disable=wrong-import-position
from retina_jax import models  # pylint: disable=wrong-import-position
from retina_jax import optim  # pylint: disable=wrong-import-position
from retina_jax import train  # pylint: disable=wrong-import-position
from retina_jax.data import categories  # pylint: disable=wrong-import-position
from retina_jax.data import canvas as canvas_lib  # pylint: disable=wrong-import-position
from retina_jax.data import preprocess  # pylint: disable=wrong-import-position
from retina_jax.data import resize  # pylint: disable=wrong-import-position
from tests import tiny_detector  # pylint: disable=wrong-import-position
from tests import torchvision_reference  # pylint: disable=wrong-import-position

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_COMPAT = str(_ROOT / 'experiments' / 'torchvision_compat.py')
MIN_SIZE, MAX_SIZE = 128, 200
# (h, w) -> resized by torchvision at 128 / 200: upsampled landscape 128x196 and portrait
# 194x128, downsampled past the cap 121x200 and 199x121; no side a multiple of 32, and two
# canvases (128x224, 224x128) for the four, so that there are two compilations.
SIZES = ((75, 115), (117, 77), (250, 410), (411, 250))
_OVERRIDES = {'model.backbone': 'resnet18', 'model.fpn_channels': 64,
              'model.head_channels': 64, 'data.min_size': MIN_SIZE, 'data.max_size': MAX_SIZE,
              'data.image_size': 224}


def compat_config():
  config = config_lib.load_experiment(_COMPAT).get_config()
  for key, value in _OVERRIDES.items():
    config_lib.set_by_path(config, key, value)
  return config


def _cli_overrides() -> list[str]:
  return [f'--config.{k}={v}' for k, v in _OVERRIDES.items()]


def _photo(h, w, seed):
  """Smooth content with noise on top: the resize's interpolation shows in every pixel."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(h // 6, 2), max(w // 6, 2), 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int16)
  return np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _as_tensor(image: np.ndarray):
  return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255.0)


@pytest.fixture(scope='module')
def tv_model():
  return torchvision_reference.small_retinanet(MIN_SIZE, MAX_SIZE)


@pytest.fixture(scope='module')
def params_file(tv_model, tmp_path_factory):
  variables, report = convert.convert_state_dict(torchvision_reference.numpy_state_dict(tv_model))
  assert not report.missing and not report.unexpected
  # Any name but an export's params.msgpack: a converted file is not an export folder.
  path = tmp_path_factory.mktemp('converted') / 'retinanet.msgpack'
  convert.save_variables(variables, str(path))
  return path


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp('images')
  out = []
  for i, (h, w) in enumerate(SIZES):
    path = folder / f'{h}x{w}.png'  # Lossless, so both sides decode the same pixels.
    Image.fromarray(_photo(h, w, seed=i)).save(path)
    out.append(path)
  return out


def _torchvision_detections(tv_model, path):
  tv_model.eval()
  with torch.no_grad():
    out = tv_model([_as_tensor(np.asarray(Image.open(path).convert('RGB')))])[0]
  return {k: v.numpy() for k, v in out.items()}


def assert_same_detections(want, boxes, scores, labels, what):
  """One-to-one: each torchvision detection has its own of ours with the same label, score
  within 1e-4 and box within 0.05 px (near-equal scores may come in another order)."""
  assert len(scores) == len(want['scores']), what
  assert len(want['scores']) > 100, what  # Many detections, so the comparison means something.
  free = np.ones(len(scores), bool)
  for box, score, label in zip(want['boxes'], want['scores'], want['labels']):
    diff = np.maximum(np.abs(boxes - box).max(axis=1) / 0.05, np.abs(scores - score) / 1e-4)
    diff = np.where(free & (labels == label), diff, np.inf)
    i = int(np.argmin(diff))
    assert diff[i] <= 1, (what, box, score, label, boxes[i], scores[i])
    free[i] = False


def test_resize_rule_is_torchvisions_interpolate():
  for i, (h, w) in enumerate(SIZES + ((480, 640), (1080, 1920))):
    image = _photo(h, w, seed=i)
    for min_size, max_size in ((MIN_SIZE, MAX_SIZE), (800, 1333)):
      (nh, nw), (sy, sx) = resize.resize_geometry(h, w, min_size, max_size, 1408, 'torchvision')
      scale = min(min_size / min(h, w), max_size / max(h, w))
      want = torch.nn.functional.interpolate(
          _as_tensor(image)[None], scale_factor=scale, mode='bilinear',
          recompute_scale_factor=True, align_corners=False)[0].numpy().transpose(1, 2, 0)
      got = resize.resize_image(image, (nh, nw), 'torchvision')
      assert got.shape == want.shape
      np.testing.assert_allclose(got / 255.0, want, rtol=0, atol=2e-6)
      assert (sy, sx) == (np.float32(nh) / np.float32(h), np.float32(nw) / np.float32(w))


def test_predict_cli_gives_torchvisions_detections(tv_model, params_file, images, tmp_path):
  # A persistent compilation cache: the second image of a canvas loads the first's detector.
  env = tiny_detector.subprocess_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
                                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  for path in images:
    out = tmp_path / f'{path.stem}.json'
    subprocess.run(
        [sys.executable, '-m', 'retina_jax.predict', f'--config={_COMPAT}', *_cli_overrides(),
         f'--params={params_file}', f'--image={path}', f'--json={out}'],
        check=True, capture_output=True, text=True, env=env)
    dets = json.loads(out.read_text())['detections']
    want = _torchvision_detections(tv_model, path)
    assert len(want['scores']) == tv_model.detections_per_img  # The cap binds: all 300.
    xywh = np.asarray([d['bbox'] for d in dets], np.float64).reshape(-1, 4)
    assert_same_detections(want, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                           np.asarray([d['score'] for d in dets]),
                           np.asarray([d['category_id'] for d in dets]), path.name)


def test_evaluate_cli_gives_torchvisions_detections(tv_model, params_file, images, tmp_path):
  """A COCO-format folder of the same images; every image's entries in detections_val.json
  are torchvision's detections of that image run alone."""
  root = tmp_path / 'coco'
  (root / 'val').mkdir(parents=True)
  (root / 'annotations').mkdir()
  names = categories.torchvision_coco_v1().names
  gt = {'images': [], 'annotations': [],
        'categories': [{'id': i, 'name': n} for i, n in enumerate(names)
                       if n not in ('__background__', 'N/A')]}
  for image_id, path in enumerate(images, start=1):
    (root / 'val' / path.name).write_bytes(path.read_bytes())
    h, w = np.asarray(Image.open(path)).shape[:2]
    gt['images'].append({'id': image_id, 'file_name': path.name, 'height': h, 'width': w})
    gt['annotations'].append({'id': image_id, 'image_id': image_id, 'category_id': 1,
                              'bbox': [2, 3, w / 2, h / 3], 'area': w * h / 6, 'iscrowd': 0})
  (root / 'annotations' / 'instances_val.json').write_text(json.dumps(gt))
  out = tmp_path / 'eval'
  subprocess.run(
      [sys.executable, '-m', 'retina_jax.evaluate', f'--config={_COMPAT}', *_cli_overrides(),
       '--config.data.name=coco_format', f'--config.data.root={root}',
       '--config.data.eval_split=val', '--config.eval_batch_size=1', '--config.data.num_workers=1',
       f'--params={params_file}', f'--workdir={out}'],
      check=True, capture_output=True, text=True,
      env=tiny_detector.subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=1'))
  results = json.loads((out / 'detections_val.json').read_text())
  for image_id, path in enumerate(images, start=1):
    mine = [r for r in results if r['image_id'] == image_id]
    xywh = np.asarray([r['bbox'] for r in mine], np.float64).reshape(-1, 4)
    assert_same_detections(_torchvision_detections(tv_model, path),
                           np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                           np.asarray([r['score'] for r in mine]),
                           np.asarray([r['category_id'] for r in mine]), path.name)


def _train_example(h, w, seed):
  """An image with 3 objects (original pixels), labels in torchvision's 1..90."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.5, (3, 2)) * [w, h]
  wh = rng.uniform(0.2, 0.5, (3, 2)) * [w, h]
  return {'image': _photo(h, w, seed), 'boxes': np.concatenate([xy, xy + wh], 1).astype(np.float32),
          'labels': rng.integers(1, 91, 3).astype(np.int32), 'is_crowd': np.zeros(3, bool),
          'image_id': seed}


def _torchvision_step(tv_model, examples, optimizer):
  """torchvision's train-mode losses and gradients, then `optimizer.step()` (as its reference
  engine: the sum of the loss dict, backward, step) -> (losses, grads by state-dict name)."""
  tv_model.train()
  optimizer.zero_grad()
  losses = tv_model([_as_tensor(e['image']) for e in examples],
                    [{'boxes': torch.from_numpy(e['boxes']),
                      'labels': torch.from_numpy(e['labels']).long()} for e in examples])
  sum(losses.values()).backward()
  grads = {n: p.grad.numpy().copy() for n, p in tv_model.named_parameters() if p.requires_grad}
  optimizer.step()
  return {k: v.item() for k, v in losses.items()}, grads


def _as_our_tree(tv_model, named: dict) -> dict:
  """torchvision-named arrays (gradients, updated weights) -> our 'params' tree, through the
  converter (the state dict fills in what `named` lacks, so the architecture reads the same)."""
  sd = torchvision_reference.numpy_state_dict(tv_model)
  variables, _ = convert.convert_state_dict({**sd, **named})
  return variables['params']


def _assert_trees_close(got, want, params, rtol, what):
  """Every trained leaf (not frozen by config.model.freeze_at=2) within rtol of want, relative
  to want's norm; head, FPN and backbone leaves all take part."""
  frozen = models.frozen_mask(params, 2)
  checked = set()
  for (path, g), w, f in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                             jax.tree.leaves(frozen)):
    if f:
      continue
    name = jax.tree_util.keystr(path)
    err = np.linalg.norm(np.asarray(g) - w) / np.linalg.norm(w)
    assert err <= rtol, (what, name, err)
    checked.add(name.split("'")[1])
  assert checked == {'backbone', 'fpn', 'cls_head', 'box_head'}, checked


@pytest.mark.parametrize('sizes', [((75, 115),), ((117, 77), (250, 410))], ids=['b1', 'b2'])
def test_training_step_equals_torchvisions(sizes):
  """Losses, gradients and two SGD steps (momentum, weight decay as torchvision's reference
  scripts apply it: every trainable parameter) from the same weights and targets; batch 2 holds
  a portrait and a landscape image, padded to the batch's largest sides as torchvision pads."""
  tv_model = torchvision_reference.small_retinanet(MIN_SIZE, MAX_SIZE)
  examples = [_train_example(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
  config = compat_config()
  config.batch_size = len(examples)
  # A large decay, so that decaying or not decaying the biases shows in the update.
  config.optim.update(warmup_steps=0, weight_decay=0.05)
  lr = float(optim.learning_rate_schedule(config)(0))
  optimizer = torch.optim.SGD([p for p in tv_model.parameters() if p.requires_grad], lr=lr,
                              momentum=config.optim.momentum,
                              weight_decay=config.optim.weight_decay)

  canvas = np.max([canvas_lib.canvas_for(config.data, h, w, 'torchvision') for h, w in sizes],
                  0)
  data = config.data.copy_and_resolve_references()
  data.max_boxes = 4
  assert (data.min_size, data.max_size, data.image_size, data.resize) == (
      MIN_SIZE, MAX_SIZE, 224, 'torchvision')
  rows = [preprocess.preprocess(e, data, canvas=tuple(canvas)) for e in examples]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in train.TRAIN_INPUTS}
  variables, _ = convert.convert_state_dict(torchvision_reference.numpy_state_dict(tv_model))
  model = models.create_model(config)
  loss_and_grads = jax.jit(lambda p: train.loss_and_grads(p, variables['batch_stats'], batch,
                                                          model=model, config=config))
  params = jax.tree.map(jnp.asarray, variables['params'])
  tx = optim.make_optimizer(config, params)
  opt_state = tx.init(params)
  for step in range(2):
    (_, (parts, _)), grads = loss_and_grads(params)
    want_losses, want_grads = _torchvision_step(tv_model, examples, optimizer)
    np.testing.assert_allclose(float(parts['cls_loss']), want_losses['classification'],
                               rtol=1e-5)
    np.testing.assert_allclose(float(parts['box_loss']), want_losses['bbox_regression'],
                               rtol=1e-5)
    _assert_trees_close(grads, _as_our_tree(tv_model, want_grads), params, 1e-4,
                        f'gradients, step {step}')
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    # The new weights to float32 rounding; leaving the biases undecayed would move them by
    # lr * weight_decay >= 3e-5 relative.
    new_weights = {n: p.detach().numpy() for n, p in tv_model.named_parameters()}
    _assert_trees_close(params, _as_our_tree(tv_model, new_weights), params, 2e-6,
                        f'weights after SGD step {step}')
