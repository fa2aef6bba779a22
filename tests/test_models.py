"""RetinaNet model: init prior, output layout, dtypes, norms and freezing (tiny model, CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retina_jax import anchors as anchors_lib
from retina_jax import config as config_lib
from retina_jax import models
from retina_jax.models import fpn as fpn_lib
from retina_jax.models import layers
from retina_jax.models import resnet


def tiny_config(**model_overrides):
  config = config_lib.get_base_config()
  config.model.backbone = 'tiny'
  config.model.fpn_channels = 32
  config.model.head_channels = 32
  config.model.head_convs = 2  # Every conv is compiled once per level: keep tests quick.
  config.model.dtype = 'float32'
  config.model.update(model_overrides)
  return config


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config()
  model = models.create_model(config)
  # The 'rbg' generator compiles faster than threefry; the numbers do not matter here.
  variables = models.init_variables(model, jax.random.key(0, impl='rbg'), 128)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return config, model, variables, apply


def images(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_init_mean_probability_is_prior(tiny):
  config, _, variables, apply = tiny
  out = apply(variables, images((2, 128, 128, 3)))
  mean_p = float(jnp.mean(jax.nn.sigmoid(out['cls_logits'])))
  assert abs(mean_p - config.model.prior_prob) < 0.002, mean_p
  # The box head starts near zero (weights N(0, 0.01), bias 0), not at an arbitrary offset.
  assert float(jnp.abs(out['box_deltas']).max()) < 0.5


def test_output_shapes_and_anchor_count_per_level(tiny):
  config, model, variables, _ = tiny
  h, w = 128, 256  # Not square, so that a swapped H/W shows.
  out, state = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=lambda mdl, method: (
          isinstance(mdl, fpn_lib.FPN) and method == '__call__')))(
          variables, images((2, h, w, 3)))
  pyramid = state['intermediates']['fpn']['__call__'][0]
  levels = range(config.model.min_level, config.model.max_level + 1)
  assert sorted(pyramid) == [f'p{l}' for l in levels]
  for l in levels:
    assert pyramid[f'p{l}'].shape == (2, h // 2**l, w // 2**l, config.model.fpn_channels)
  num_anchors = 9 * sum((h // 2**l) * (w // 2**l) for l in levels)
  assert num_anchors == 9 * (16 * 32 + 8 * 16 + 4 * 8 + 2 * 4 + 1 * 2)
  assert out['cls_logits'].shape == (2, num_anchors, config.model.num_classes)
  assert out['box_deltas'].shape == (2, num_anchors, 4)
  assert out['cls_logits'].dtype == out['box_deltas'].dtype == jnp.float32


def test_sides_that_are_multiples_of_32_only_give_ceil_grids_on_p6_p7(tiny):
  config, model, variables, _ = tiny
  h, w = 96, 160  # 3 x 5 on C5; P6 2 x 3 and P7 1 x 2 from the stride-2 convs.
  out = jax.jit(model.apply)(variables, images((1, h, w, 3)))
  grids = anchors_lib.grid_sizes(config.model.min_level, config.model.max_level, (h, w))
  assert grids[-2:] == ((2, 3), (1, 2))
  sizes = anchors_lib.anchors_per_level(config.anchors, config.model.min_level,
                                        config.model.max_level, (h, w))
  assert sum(sizes) == 9 * sum(gh * gw for gh, gw in grids)
  assert out['cls_logits'].shape == (1, sum(sizes), config.model.num_classes)


def test_head_layout_is_level_then_location_then_anchor(tiny):
  """Row n of the output is (level, y, x, anchor) in that order; class channel = a * K + k."""
  config, model, variables, _ = tiny
  k = config.model.num_classes
  x = images((1, 128, 128, 3))
  out, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True))(variables, x)
  conv_out = state['intermediates']['cls_head']['out']['__call__']  # One per level.
  p3 = conv_out[0]  # [1, 16, 16, A * K]
  y, xx, a, c = 5, 11, 7, 3
  n = (y * 16 + xx) * 9 + a
  np.testing.assert_array_equal(out['cls_logits'][0, n, c], p3[0, y, xx, a * k + c])
  p4 = conv_out[1]  # [1, 8, 8, A * K]
  n = 16 * 16 * 9 + (2 * 8 + 6) * 9 + 4
  np.testing.assert_array_equal(out['cls_logits'][0, n, 1], p4[0, 2, 6, 4 * k + 1])


def test_bfloat16_is_finite_and_close_to_float32(tiny):
  _, _, variables, apply = tiny
  # Head outputs at init are the constant bias plus ~1e-4; scale the output kernels up so that
  # the comparison sees the image-dependent part, not only bf16's rounding of the bias.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * 100 if path[-2].key == 'out' and path[-1].key == 'kernel' else p,
      variables['params'])
  variables = {**variables, 'params': params}
  x = images((2, 128, 128, 3))
  ref = apply(variables, x)
  bf16 = models.create_model(tiny_config(dtype='bfloat16'))
  out = jax.jit(lambda v, x: bf16.apply(v, x))(variables, x)
  for name in ('cls_logits', 'box_deltas'):
    assert out[name].dtype == jnp.float32
    assert bool(jnp.isfinite(out[name]).all())
    err = jnp.abs(out[name] - ref[name])
    # bf16 has 8 significant bits: allow a few units of its rounding on the value and spread.
    assert float(jnp.max(err - 0.02 * jnp.abs(ref[name]))) < 0.05 * float(jnp.std(ref[name])), name
    assert float(jnp.std(ref[name])) > 0.01  # The comparison is not vacuous.


def test_strided_convs_pad_like_pytorch():
  """Stem 7x7/2 pad 3 reads the top-left pixel through kernel tap (3, 3), as PyTorch does.

  XLA's 'SAME' would pad 2 on top/left (3 bottom/right) and read it through tap (2, 2).
  """
  stem = resnet._conv(1, 7, 2, 3, jnp.float32, 'conv1')  # pylint: disable=protected-access
  probe = jnp.zeros((1, 64, 64, 1)).at[0, 0, 0, 0].set(1.0)
  kernel = jnp.zeros((7, 7, 1, 1)).at[3, 3, 0, 0].set(1.0)
  out = stem.apply({'params': {'kernel': kernel}}, probe)
  assert out.shape == (1, 32, 32, 1)
  assert float(out[0, 0, 0, 0]) == 1.0 and float(jnp.abs(out).sum()) == 1.0
  # Max pool 3x3/2 pad 1 pads with -inf: an all-negative map stays negative at the border.
  pooled = nn.max_pool(-jnp.ones((1, 4, 4, 1)), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(pooled, -np.ones((1, 2, 2, 1)))


@pytest.mark.parametrize('freeze_at, frozen', [
    (0, set()),
    (1, {'conv1', 'bn1'}),
    (2, {'conv1', 'bn1', 'layer1_0'}),
])
def test_frozen_mask(freeze_at, frozen):
  config = tiny_config(norm='bn')
  variables = jax.eval_shape(
      lambda: models.init_variables(models.create_model(config), jax.random.key(0), 128))
  mask = models.frozen_mask(variables['params'], freeze_at)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(variables['params'])
  flat = {'/'.join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  got = {p.split('/')[1] for p, v in flat.items() if v}
  assert got == frozen
  assert all(p.startswith('backbone/') for p, v in flat.items() if v)
  assert not any(v for p, v in flat.items() if p.startswith(('fpn/', 'cls_head/', 'box_head/')))


def test_frozen_stages_get_no_gradient_and_bn_updates_only_unfrozen_stages():
  model = resnet.ResNet(backbone='tiny', norm='bn', freeze_at=2)
  x = images((2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)

  def loss(params):
    out, updates = model.apply({**variables, 'params': params}, x, train=True,
                               mutable=['batch_stats'])
    return sum(jnp.sum(f ** 2) for f in out.values()), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  for name in ('conv1', 'bn1', 'layer1_0'):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads[name]))
  assert float(jnp.abs(grads['layer2_0']['conv1']['kernel']).max()) > 0.0
  old, new = variables['batch_stats'], updates['batch_stats']
  np.testing.assert_array_equal(new['layer1_0']['bn1']['mean'], old['layer1_0']['bn1']['mean'])
  np.testing.assert_array_equal(new['bn1']['var'], old['bn1']['var'])
  assert not np.array_equal(new['layer2_0']['bn1']['mean'], old['layer2_0']['bn1']['mean'])


def test_group_norm_backbone_has_no_batch_stats_and_runs():
  model = resnet.ResNet(backbone='tiny', norm='gn')
  x = images((1, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)
  assert not variables.get('batch_stats')
  out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
  assert out['c5'].shape == (1, 2, 2, 128) and bool(jnp.isfinite(out['c5']).all())


def test_group_norm_matches_numpy():
  x = np.asarray(images((2, 4, 4, 64)))
  gn = resnet.GroupNorm()
  variables = gn.init(jax.random.key(0), x)
  got = gn.apply(variables, x)
  xg = x.reshape(2, 4, 4, 32, 2)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_frozen_batch_norm_matches_formula():
  x = np.asarray(images((2, 3, 3, 8)))
  stats = {k: np.asarray(v) for k, v in {
      'scale': images((8,), 2), 'bias': images((8,), 3), 'mean': images((8,), 4),
      'var': jnp.exp(images((8,), 5))}.items()}
  got = resnet.FrozenBatchNorm().apply({'batch_stats': stats}, x)
  want = (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * stats['scale'] + stats['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_p6_source_switch():
  for p6_from, in_channels in (('c5', resnet.stage_channels('tiny')[-1]), ('p5', 32)):
    config = tiny_config(p6_from=p6_from)
    shapes = jax.eval_shape(
        lambda: models.init_variables(models.create_model(config), jax.random.key(0), 128))
    assert shapes['params']['fpn']['p6']['kernel'].shape == (3, 3, in_channels, 32)


def test_upsample2x_is_nearest():
  x = np.arange(2 * 2 * 3 * 1, dtype=np.float32).reshape(2, 2, 3, 1)
  want = x.repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_array_equal(fpn_lib.upsample2x(jnp.asarray(x)), want)



@pytest.mark.parametrize('k, stride, pad', [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)])
def test_cpu_conv_and_its_gradients_match_xla_conv(k, stride, pad):
  x = images((2, 12, 16, 5))
  kernel = images((k, k, 5, 6), seed=2)
  dy_seed = images((2, (12 + 2 * pad - k) // stride + 1, (16 + 2 * pad - k) // stride + 1, 6), 3)
  ref = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, w: layers.conv2d(x, w, stride, pad)
  for fn in (ref, ours):
    assert fn(x, kernel).shape == dy_seed.shape
  loss = lambda fn: jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * dy_seed), (0, 1)))
  np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-4)
  for got, want in zip(loss(ours)(x, kernel), loss(ref)(x, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
