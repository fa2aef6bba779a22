"""ResNet backbones (NHWC) laid out like torchvision's, so converted weights fit one to one.

Bottleneck blocks put the stride on the 3x3 conv (torchvision "v1.5"). Every padding is explicit
and equal to PyTorch's: XLA's 'SAME' pads strided convs asymmetrically (more at the bottom/right),
which shifts every feature by a pixel against converted weights.

Parameter tree (flax names; torchvision's in brackets):
  conv1 [conv1], bn1 [bn1],
  layer{s}_{b}/conv{i} [layer{s}.{b}.conv{i}], layer{s}_{b}/bn{i} [layer{s}.{b}.bn{i}],
  layer{s}_{b}/downsample_conv [.downsample.0], layer{s}_{b}/downsample_bn [.downsample.1].
Norm leaves are scale, bias (weight, bias) and mean, var (running_mean, running_var); with
`frozen_bn` all four live in 'batch_stats', with `bn` scale/bias are params.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from retina_jax import sharding
from retina_jax.models import layers

# Blocks per stage (layer1..layer4) and whether the block is a bottleneck.
_ARCHS = {
    'tiny': ((1, 1, 1, 1), False),
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
}
# Stage widths (the 3x3 conv's channels); a bottleneck's output is 4x wider.
_WIDTHS = {'tiny': (16, 32, 64, 128)}
_DEFAULT_WIDTHS = (64, 128, 256, 512)
_BN_EPS = 1e-5  # torchvision's BatchNorm2d and FrozenBatchNorm2d.

# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def stage_channels(backbone: str) -> tuple[int, ...]:
  """Output channels of C2..C5 for a backbone name."""
  _, bottleneck = _ARCHS[backbone]
  widths = _WIDTHS.get(backbone, _DEFAULT_WIDTHS)
  return tuple(w * (4 if bottleneck else 1) for w in widths)


class FrozenBatchNorm(nn.Module):
  """torchvision's FrozenBatchNorm2d: y = x * scale + shift from fixed statistics.

  All four leaves are in 'batch_stats' so that no optimizer sees them; the folding into one
  per-channel multiply-add happens in float32 on [C] vectors, then the activations see a single
  fused multiply-add in the compute dtype.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [..., C]
    c = x.shape[-1]
    stat = lambda name, init: self.variable('batch_stats', name, init, (c,), jnp.float32).value
    weight = stat('scale', jnp.ones)
    bias = stat('bias', jnp.zeros)
    mean = stat('mean', jnp.zeros)
    var = stat('var', jnp.ones)
    scale = weight * jax.lax.rsqrt(var + _BN_EPS)
    shift = bias - mean * scale
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


def make_norm(kind: str, dtype: Any, train: bool) -> Callable[..., nn.Module]:
  """A norm-layer factory: call it with a name inside a compact module.

  `bn` normalizes with the batch statistics when training; under jit over a batch sharded across
  devices the mean is over the global batch, i.e. synchronized BN without an axis name.
  """
  if kind == 'frozen_bn':
    return lambda name: FrozenBatchNorm(dtype=dtype, name=name)
  if kind == 'bn':
    return lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=_BN_EPS, dtype=dtype, name=name)
  if kind == 'gn':
    return lambda name: GroupNorm(dtype=dtype, name=name)
  raise ValueError(f'Unknown config.model.norm {kind!r}; expected frozen_bn, bn or gn.')


class GroupNorm(nn.Module):
  """GroupNorm with 32 groups, eps as PyTorch; the tiny model's 16 channels get 16 groups."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, C]
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    groups = min(32, c)
    xg = x.reshape(x.shape[:-1] + (groups, c // groups)).astype(jnp.float32)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + _BN_EPS)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def _conv(features, kernel, stride, pad, dtype, name):
  return layers.Conv(features, kernel, stride, pad, use_bias=False, dtype=dtype,
                     kernel_init=_conv_init, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); the stride is on the first."""
  width: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, Cin] -> [B, H / stride, W / stride, width]
    y = _conv(self.width, 3, self.stride, 1, self.dtype, 'conv1')(x)
    y = nn.relu(self.norm('bn1')(y))
    y = _conv(self.width, 3, 1, 1, self.dtype, 'conv2')(y)
    y = self.norm('bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = _conv(self.width, 1, self.stride, 0, self.dtype, 'downsample_conv')(x)
      x = self.norm('downsample_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, torchvision v1.5) -> 1x1 with 4x expansion (ResNet-50/101)."""
  width: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, Cin] -> [B, H / stride, W / stride, 4 * width]
    out = 4 * self.width
    y = _conv(self.width, 1, 1, 0, self.dtype, 'conv1')(x)
    y = nn.relu(self.norm('bn1')(y))
    y = _conv(self.width, 3, self.stride, 1, self.dtype, 'conv2')(y)
    y = nn.relu(self.norm('bn2')(y))
    y = _conv(out, 1, 1, 0, self.dtype, 'conv3')(y)
    y = self.norm('bn3')(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = _conv(out, 1, self.stride, 0, self.dtype, 'downsample_conv')(x)
      x = self.norm('downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet trunk returning {'c2': stride 4, 'c3': 8, 'c4': 16, 'c5': 32} NHWC features.

  Stages below `freeze_at` (1: stem, 2: stem and layer1, detectron2's meaning) are cut from the
  backward pass with stop_gradient, as torchvision/detectron2 do with requires_grad=False: nothing
  upstream is trainable, so their backward is pure waste. Their batch statistics never update.
  `frozen_mask` in retinanet.py keeps the optimizer (weight decay) off their parameters.
  """
  backbone: str = 'resnet50'
  norm: str = 'frozen_bn'
  freeze_at: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):  # x: [B, H, W, 3] -> dict of [B, H/s, W/s, C]
    if self.backbone not in _ARCHS:
      raise ValueError(f'Unknown config.model.backbone {self.backbone!r}; '
                       f'expected one of {sorted(_ARCHS)}.')
    blocks, bottleneck = _ARCHS[self.backbone]
    widths = _WIDTHS.get(self.backbone, _DEFAULT_WIDTHS)
    block_cls = Bottleneck if bottleneck else BasicBlock

    norm = make_norm(self.norm, self.dtype, train and self.freeze_at < 1)
    constrain = lambda y: sharding.constrain(y, layers.FEATURE_MAP)
    x = constrain(x.astype(self.dtype))
    x = _conv(widths[0], 7, 2, 3, self.dtype, 'conv1')(x)
    x = constrain(nn.relu(norm('bn1')(x)))
    # Padding with -inf (flax's max_pool pads with the reduction's init value), as PyTorch.
    x = constrain(nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)

    features = {}
    for stage, (num_blocks, width) in enumerate(zip(blocks, widths), start=1):
      frozen = self.freeze_at >= stage + 1
      stage_norm = make_norm(self.norm, self.dtype, train and not frozen)
      for b in range(num_blocks):
        stride = 2 if (stage > 1 and b == 0) else 1
        x = constrain(block_cls(width, stride, stage_norm, self.dtype, name=f'layer{stage}_{b}')(x))
      if frozen:
        x = jax.lax.stop_gradient(x)
      features[f'c{stage + 1}'] = x
    return features

