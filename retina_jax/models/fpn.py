"""Feature pyramid (Lin et al. 2017) with RetinaNet's P6/P7, laid out like torchvision's.

Parameter tree (flax names; torchvision's `backbone.fpn.*` in brackets, i = level - 3):
  lateral_c{l} [inner_blocks.{i}.0], output_p{l} [layer_blocks.{i}.0] for l in min_level..5,
  p6 [extra_blocks.p6], p7 [extra_blocks.p7] (and p8.. if max_level asks for them).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax import sharding
from retina_jax.models import layers

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)), biases 0.
_fpn_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def upsample2x(x):
  """Nearest-neighbour 2x: x [B, H, W, C] -> [B, 2H, 2W, C] (a broadcast, no gather)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class FPN(nn.Module):
  """Backbone features {'c2'..'c5'} -> {'p{l}': [B, H / 2**l, W / 2**l, channels]}.

  Image sides must be multiples of 32 (the stride of C5) so that every top-down step is an exact
  2x (torchvision's interpolate to the lateral's size is then the same thing). P6 and P7 come
  from stride-2 convs and have ceil(side / 2**l) rows and columns (anchors.grid_sizes).
  """
  channels: int = 256
  min_level: int = 3
  max_level: int = 7
  p6_from: str = 'c5'  # c5: paper, detectron2 | p5: torchvision v1, TF TPU
  dtype: Any = jnp.float32

  def _conv(self, kernel, stride, name):
    conv = layers.Conv(self.channels, kernel, stride, kernel // 2, dtype=self.dtype,
                       kernel_init=_fpn_init, name=name)
    return lambda x: sharding.constrain(conv(x), layers.FEATURE_MAP)

  @nn.compact
  def __call__(self, features):
    if self.p6_from not in ('c5', 'p5'):
      raise ValueError(f'Unknown config.model.p6_from {self.p6_from!r}; expected c5 or p5.')
    if not 2 <= self.min_level <= 5 or self.max_level < 5:
      raise ValueError(f'FPN levels {self.min_level}..{self.max_level}: need min_level in 2..5 '
                       'and max_level >= 5.')
    backbone_levels = range(self.min_level, 6)
    laterals = {l: self._conv(1, 1, f'lateral_c{l}')(features[f'c{l}']) for l in backbone_levels}
    # Top-down: each level adds the upsampled sum of the coarser ones to its own lateral.
    merged = {5: laterals[5]}
    for l in reversed(backbone_levels[:-1]):
      merged[l] = sharding.constrain(laterals[l] + upsample2x(merged[l + 1]),
                                     layers.FEATURE_MAP)
    pyramid = {f'p{l}': self._conv(3, 1, f'output_p{l}')(merged[l]) for l in backbone_levels}
    if self.max_level >= 6:
      source = features['c5'] if self.p6_from == 'c5' else pyramid['p5']
      pyramid['p6'] = self._conv(3, 2, 'p6')(source)
    for l in range(7, self.max_level + 1):
      pyramid[f'p{l}'] = self._conv(3, 2, f'p{l}')(nn.relu(pyramid[f'p{l - 1}']))
    return pyramid
