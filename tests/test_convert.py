"""torchvision -> retina_jax weight conversion, checked against torchvision's own forward pass."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is needed for the torchvision reference tests')
torchvision = pytest.importorskip('torchvision')

from retina_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from retina_jax import convert  # pylint: disable=wrong-import-position
from retina_jax import models  # pylint: disable=wrong-import-position
from retina_jax.models import resnet  # pylint: disable=wrong-import-position
from tests.torchvision_reference import numpy_state_dict, randomize_  # pylint: disable=wrong-import-position

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _ROOT / 'scripts' / 'convert_torchvision.py'


@pytest.fixture(scope='module')
def torch_retinanet():
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
  with torch.no_grad():
    for name, p in model.head.named_parameters():
      if name.endswith('weight'):
        p.normal_(0.0, 0.03)  # Larger than the N(0, 0.01) init, so the outputs vary.
  return randomize_(model)


def compat_config():
  config = config_lib.get_base_config()
  config.model.update(p6_from='p5', num_classes=91, dtype='float32', norm='frozen_bn')
  return config


def test_retinanet_matches_torchvision_head_outputs(torch_retinanet):
  variables, report = convert.convert_state_dict(numpy_state_dict(torch_retinanet))
  assert report.kind == 'retinanet' and not report.missing and not report.unexpected
  assert report.architecture['p6_from'] == 'p5' and report.architecture['num_classes'] == 91
  assert not variables['params']['backbone'].get('bn1')  # Frozen BN: nothing trainable.

  x = torch.randn(1, 3, 256, 384, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = torch_retinanet.head(list(torch_retinanet.backbone(x).values()))
  model = models.create_model(compat_config())
  got = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  for ours, theirs in (('cls_logits', 'cls_logits'), ('box_deltas', 'bbox_regression')):
    ref = want[theirs].numpy()
    assert got[ours].shape == ref.shape
    assert np.std(ref) > 0.1  # Not a comparison of near-constant outputs.
    np.testing.assert_allclose(np.asarray(got[ours]), ref, rtol=0, atol=1e-4, err_msg=ours)


def test_old_checkpoint_key_layout_converts_the_same(torch_retinanet):
  """The published retinanet_resnet50_fpn_coco checkpoint predates Conv2dNormActivation."""
  sd = numpy_state_dict(torch_retinanet, keep_num_batches_tracked=False)
  old = {}
  for key, value in sd.items():
    parts = key.split('.')
    if key.startswith('backbone.fpn.') and parts[2] in ('inner_blocks', 'layer_blocks'):
      key = '.'.join(parts[:4] + parts[5:])  # inner_blocks.i.0.weight -> inner_blocks.i.weight
    elif key.startswith('head.') and parts[2] == 'conv':
      key = '.'.join(parts[:3] + [str(2 * int(parts[3]))] + parts[5:])  # conv.j.0 -> conv.{2j}
    old[key] = value
  new_vars, _ = convert.convert_state_dict(sd)
  old_vars, report = convert.convert_state_dict(old)
  assert not report.missing and not report.unexpected
  jax.tree_util.tree_map(np.testing.assert_array_equal, old_vars, new_vars)


def test_resnet50_imagenet_converts_backbone_and_c5_matches():
  torch.manual_seed(0)
  net = randomize_(torchvision.models.resnet50(weights=None))
  variables, report = convert.convert_state_dict(numpy_state_dict(net, False))
  assert report.kind == 'resnet' and report.architecture == {'backbone': 'resnet50'}
  assert report.unexpected == ['fc.bias', 'fc.weight'] and not report.missing
  assert set(variables['params']) == set(variables['batch_stats']) == {'backbone'}

  x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    want = net.layer4(net.layer3(net.layer2(net.layer1(y)))).numpy().transpose(0, 2, 3, 1)
  backbone = resnet.ResNet(backbone='resnet50')
  got = jax.jit(lambda v, x: backbone.apply(v, x)['c5'])(
      {c: t['backbone'] for c, t in variables.items()}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert got.shape == want.shape == (1, 2, 3, 2048)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_norm_bn_puts_affine_in_params():
  sd = numpy_state_dict(torchvision.models.resnet18(weights=None))
  variables, report = convert.convert_state_dict(sd, norm='bn')
  assert report.architecture == {'backbone': 'resnet18'}
  bn1 = sd['bn1.weight']
  np.testing.assert_array_equal(variables['params']['backbone']['bn1']['scale'], bn1)
  assert set(variables['batch_stats']['backbone']['bn1']) == {'mean', 'var'}
  np.testing.assert_array_equal(variables['params']['backbone']['layer2_0']['conv1']['kernel'],
                                sd['layer2.0.conv1.weight'].transpose(2, 3, 1, 0))


def test_wrong_shape_fails_naming_the_key():
  sd = numpy_state_dict(torchvision.models.resnet18(weights=None))
  sd['layer3.1.conv2.weight'] = np.zeros((256, 128, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'layer3\.1\.conv2\.weight'.*\(256, 128, 3, 3\)"):
    convert.convert_state_dict(sd)


def test_missing_and_unexpected_keys_are_listed():
  sd = numpy_state_dict(torchvision.models.resnet18(weights=None))
  del sd['layer2.0.bn1.running_var'], sd['conv1.weight']
  sd['layer2.0.extra.weight'] = np.zeros((3,), np.float32)
  variables, report = convert.convert_state_dict(sd)
  assert report.missing == ['conv1.weight', 'layer2.0.bn1.running_var']
  assert report.unexpected == ['fc.bias', 'fc.weight', 'layer2.0.extra.weight']
  assert 'conv1' not in variables['params']['backbone']
  assert 'var' not in variables['batch_stats']['backbone']['layer2_0']['bn1']


def test_not_a_resnet_is_a_clear_error():
  with pytest.raises(ValueError, match='Not a torchvision ResNet'):
    convert.convert_state_dict({'encoder.weight': np.zeros((3, 3), np.float32)})


def test_cli_writes_variables_that_load_without_torch(tmp_path, capsys):
  net = torchvision.models.resnet18(weights=None)
  src, dst = tmp_path / 'r18.pth', tmp_path / 'r18.msgpack'
  sd = {k: v for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')}
  torch.save(sd, src)
  spec = importlib.util.spec_from_file_location('convert_torchvision', _SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main([str(src), str(dst)]) == 0
  printed = capsys.readouterr().out
  assert 'unexpected (unused): fc.weight' in printed and 'missing' not in printed
  loaded = convert.load_variables(str(dst))
  want, _ = convert.convert_state_dict({k: v.numpy() for k, v in sd.items()})
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, want)
  assert script.main([str(src), str(tmp_path / 'strict.msgpack'), '--strict']) == 1
  assert not (tmp_path / 'strict.msgpack').exists()


def test_training_checkpoints_and_bad_files(tmp_path, capsys):
  """torchvision's reference scripts save {'model', 'optimizer', 'args', 'epoch'}; DDP prefixes
  every key with 'module.'; anything else is one clear line from the CLI."""
  import argparse  # pylint: disable=g-import-not-at-top
  sd = torchvision.models.resnet18(weights=None).state_dict()
  want = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
  ckpt = tmp_path / 'checkpoint.pth'
  torch.save({'model': {f'module.{k}': v for k, v in sd.items()},
              'optimizer': {'state': {}, 'param_groups': [{'lr': 0.01}]},
              'args': argparse.Namespace(lr=0.01, epochs=26), 'epoch': 3}, ckpt)
  got = convert.load_torch_state_dict(str(ckpt))
  assert sorted(got) == sorted(want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  torch.save({'state_dict': sd}, tmp_path / 'lightning.ckpt')
  assert sorted(convert.load_torch_state_dict(str(tmp_path / 'lightning.ckpt'))) == sorted(want)

  spec = importlib.util.spec_from_file_location('convert_torchvision', _SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  torch.save(torch.nn.Linear(2, 2), tmp_path / 'whole_model.pth')  # A pickled module.
  torch.save({'epoch': 3, 'optimizer': {}}, tmp_path / 'no_weights.pth')
  (tmp_path / 'text.pth').write_text('not a checkpoint')
  for name, why in [('whole_model.pth', 'weights only'), ('no_weights.pth', 'expected a state'),
                    ('text.pth', 'weights only'), ('absent.pth', 'no such file')]:
    assert script.main([str(tmp_path / name), str(tmp_path / 'out.msgpack')]) == 1, name
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and name in err and why in err, err


def test_restore_into_model_variables():
  sd = numpy_state_dict(torchvision.models.resnet18(weights=None))
  loaded, _ = convert.convert_state_dict(sd)
  config = config_lib.get_base_config()
  config.model.update(backbone='resnet18', fpn_channels=16, head_channels=16, head_convs=1)
  model = models.create_model(config)
  init = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), 128))
  init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), init)
  merged, not_loaded, unused = convert.restore_into(init, loaded)
  assert not unused
  assert not_loaded and all(p.split('/')[1] in ('fpn', 'cls_head', 'box_head') for p in not_loaded)
  np.testing.assert_array_equal(merged['batch_stats']['backbone']['bn1']['var'],
                                sd['bn1.running_var'])
  bad = {'params': {'backbone': {'conv1': {'kernel': np.zeros((1, 1, 1, 1), np.float32)}}}}
  with pytest.raises(ValueError, match='params/backbone/conv1/kernel'):
    convert.restore_into(init, bad)


def test_restore_into_keeps_empty_collections():
  """A GroupNorm model has batch_stats {}: init_from must not drop it from the train state."""
  variables = {'params': {'head': {'kernel': np.zeros((2, 2), np.float32)}}, 'batch_stats': {}}
  loaded = {'params': {'head': {'kernel': np.ones((2, 2), np.float32)}}}
  merged, not_loaded, unused = convert.restore_into(variables, loaded)
  assert merged['batch_stats'] == {} and not not_loaded and not unused
  np.testing.assert_array_equal(merged['params']['head']['kernel'], 1.0)


def test_converted_retinanet_gives_torchvision_detections_end_to_end(torch_retinanet):
  """The whole torchvision model (its transform, backbone, head, anchors, decoding, NMS) on an
  image against ours (uint8 in, normalisation, the jitted detector, back to image pixels) under
  experiments/torchvision_compat.py. The image is 288x416, so torchvision's resize is the
  identity (min_size 288, max_size 416) and both sides see the same pixels without padding; its
  sides are not multiples of 64 or 128, so P6 / P7 have ceil grids and torchvision's strides
  (side // grid: 96 and 104 on P7) differ from 2**l."""
  import copy  # pylint: disable=import-outside-toplevel
  from retina_jax import inference  # pylint: disable=import-outside-toplevel
  tv = copy.deepcopy(torch_retinanet)
  with torch.no_grad():  # Scores around 0.1 instead of the prior's 0.01, so that many pass 0.05.
    tv.head.classification_head.cls_logits.bias.fill_(-2.2)
  tv.transform.min_size, tv.transform.max_size = (288,), 416
  tv.detections_per_img = 5000  # Every NMS survivor, so that P6 and P7 detections are compared.
  tv.eval()
  image = np.random.default_rng(3).integers(0, 256, (288, 416, 3), dtype=np.uint8)
  with torch.no_grad():
    want = tv([torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255.0)])[0]
  want = {k: v.numpy() for k, v in want.items()}
  assert 300 <= len(want['scores']) < 5000, len(want['scores'])  # Many, yet below the cap.

  config = config_lib.load_experiment(
      str(_ROOT / 'experiments' / 'torchvision_compat.py')).get_config()
  config.postprocess.max_detections = 5000
  variables, _ = convert.convert_state_dict(numpy_state_dict(tv))
  detect = inference.make_detect_fn(config)
  dets = detect(variables, jnp.asarray(image[None]), jnp.asarray([[288, 416]], jnp.int32))
  got = inference.to_original_coords(dets, [[1.0, 1.0]], [[288, 416]])
  valid = got['valid'][0]
  # Our labels are contiguous indices into the 91 torchvision rows: the same numbers.
  assert_same_detections(want, {k: got[k][0][valid] for k in ('boxes', 'scores', 'labels')})


def assert_same_detections(want, got, box_atol: float = 2e-3):
  """torchvision's detections `want` and ours `got` ({'boxes' [N, 4] (x1, y1, x2, y2) image
  pixels, 'scores' [N], 'labels' [N]}, valid ones only) are the same set: boxes within box_atol
  pixels, scores within 1e-5.

  One-to-one: each torchvision detection has its own detection of ours with the same label,
  score and box (near-equal scores may come in another order, and boxes clipped to the same
  degenerate box at the border differ only in score, so match on all three).
  """
  assert len(got['scores']) == len(want['scores'])
  matched = set()
  for box, score, label in zip(want['boxes'], want['scores'], want['labels']):
    diff = np.maximum(np.abs(got['boxes'] - box).max(axis=1) / box_atol,
                      np.abs(got['scores'] - score) / 1e-5) + 1e9 * (got['labels'] != label)
    i = int(np.argmin(diff))
    assert diff[i] < 1, (box, score, label, got['boxes'][i], got['scores'][i])
    matched.add(i)
  assert len(matched) == len(want['scores'])
