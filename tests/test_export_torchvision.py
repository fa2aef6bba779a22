"""--format torchvision: state dicts that torchvision's own RetinaNet (v1 and v2) loads with
strict=True, bit-exact through a round trip, and that detect in torchvision what ours detects."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is needed for the torchvision reference tests')
torchvision = pytest.importorskip('torchvision')

from retina_jax import config as config_lib  # pylint: disable=wrong-import-position
from retina_jax import convert  # pylint: disable=wrong-import-position
from retina_jax import export as export_lib  # pylint: disable=wrong-import-position
from retina_jax import inference  # pylint: disable=wrong-import-position
from retina_jax.data.categories import CategoryMap  # pylint: disable=wrong-import-position
from tests import test_convert  # pylint: disable=wrong-import-position

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_BUILDERS = {'v1': 'retinanet_resnet50_fpn', 'v2': 'retinanet_resnet50_fpn_v2'}


def compat_config(version: str, num_classes: int):
  config = config_lib.load_experiment(
      str(_ROOT / 'experiments' / 'torchvision_compat.py')).get_config(version)
  config.model.num_classes = num_classes
  return config


def torch_model(version: str, num_classes: int):
  """torchvision's model with random BN statistics, GroupNorm affines and head weights."""
  torch.manual_seed(0)
  model = getattr(torchvision.models.detection, _BUILDERS[version])(
      weights=None, weights_backbone=None, num_classes=num_classes)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.head.named_parameters():
      if name.endswith('weight') and p.ndim == 4:
        p.normal_(0.0, 0.03, generator=gen)  # Larger than the N(0, 0.01) init: outputs vary.
      elif p.ndim == 1:  # Conv biases and GroupNorm affines.
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.head.classification_head.cls_logits.bias.fill_(-2.2)  # Many scores above 0.05.
  return test_convert.randomize_(model)


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_torchvision_to_ours_to_torchvision_is_bit_exact(version):
  model = torch_model(version, num_classes=91)
  original = model.state_dict()
  variables, report = convert.convert_state_dict(
      {k: v.numpy() for k, v in original.items()})
  assert not report.missing and not report.unexpected
  assert report.architecture['head_norm'] == ('gn' if version == 'v2' else 'none')
  builder, kwargs, back = convert.to_torchvision(variables, compat_config(version, 91))
  assert builder == _BUILDERS[version] and kwargs['num_classes'] == 91
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    assert back[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  fresh = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None,
                                                         num_classes=91)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize('field,value,message', [
    ('model.p6_from', 'c5', "config.model.head_norm='none'"),  # c5 is v2: GroupNorm heads.
    ('model.norm', 'gn', "config.model.norm='gn'"),
    ('model.backbone', 'resnet101', "config.model.backbone='resnet101'"),
    ('anchors.offset', 0.5, 'config.anchors.offset=0.5'),
    ('anchors.order', 'scale_major', "config.anchors.order='scale_major'"),
])
def test_configs_without_a_torchvision_model_are_refused_naming_the_field(field, value, message):
  config = compat_config('v1', 5)
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')) as e:
    convert.torchvision_builder(config)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_exported_model_detects_in_torchvision_what_ours_detects(tmp_path):
  """Our detector on our variables against torchvision's model built from torchvision.json and
  loaded (strict) from model.pth, with its own transform, on an image its resize leaves as is
  (288 x 416 with min_size 288, max_size 416; both sides multiples of 32, so no padding).

  v2 (GroupNorm heads, P6 from C5); v1's forward pass on the same state dict is
  test_convert's end-to-end test, and the round trip above makes its export that state dict.
  """
  version = 'v2'
  cats = CategoryMap(ids=(3, 7, 11, 20, 42), names=('a', 'b', 'c', 'd', 'e'))
  config = compat_config(version, cats.num_classes)
  config.data.min_size, config.data.max_size = 288, 416
  config.postprocess.max_detections = 5000  # Every NMS survivor, P6 / P7 ones included.
  variables, _ = convert.convert_state_dict(
      {k: v.numpy() for k, v in torch_model(version, cats.num_classes).state_dict().items()})
  export_lib.write_torchvision(str(tmp_path), config, variables, cats)
  spec = json.loads((tmp_path / export_lib.TORCHVISION_JSON).read_text())
  assert spec['builder'] == _BUILDERS[version]
  assert CategoryMap.from_json((tmp_path / 'categories.json').read_text()) == cats
  tv = getattr(torchvision.models.detection, spec['builder'])(
      weights=None, weights_backbone=None, **spec['kwargs'])
  tv.load_state_dict(torch.load(tmp_path / export_lib.TORCHVISION_WEIGHTS, weights_only=True),
                     strict=True)
  tv.eval()

  image = np.random.default_rng(3).integers(0, 256, (288, 416, 3), dtype=np.uint8)
  with torch.no_grad():
    want = tv([torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255.0)])[0]
  want = {k: v.numpy() for k, v in want.items()}
  assert 300 <= len(want['scores']) < 5000, len(want['scores'])

  dets = inference.make_detect_fn(config)(variables, jnp.asarray(image[None]),
                                         jnp.asarray([[288, 416]], jnp.int32))
  got = inference.to_original_coords(dets, [[1.0, 1.0]], [[288, 416]])
  valid = got['valid'][0]
  # GroupNorm heads: float32 statistics over 8 channels x H x W per group, summed in another
  # order than torch's; a box of P7 (up to ~800 px) then moves by a few 1e-3 pixels.
  test_convert.assert_same_detections(
      want, {k: got[k][0][valid] for k in ('boxes', 'scores', 'labels')}, box_atol=5e-3)
