"""RetinaNet's class and box subnets, each shared across pyramid levels.

Parameter tree of one head (flax names; torchvision's in brackets, for the class head
`head.classification_head.*`, for the box head `head.regression_head.*`):
  conv{j} [conv.{j}.0] for j < head_convs, out [cls_logits | bbox_reg];
  with norm 'gn' also norm{j} [conv.{j}.1], and conv{j} has no bias (torchvision v2).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from retina_jax import sharding
from retina_jax.models import layers
from retina_jax.models import resnet

_head_init = nn.initializers.normal(stddev=0.01)


def prior_bias(prior_prob: float):
  """Bias init b = -log((1 - pi) / pi): every class starts at sigmoid(b) = pi (paper, 3.3)."""
  return nn.initializers.constant(-math.log((1.0 - prior_prob) / prior_prob))


class Head(nn.Module):
  """num_convs x (3x3 conv [+ GroupNorm] + ReLU) then a 3x3 conv to A * per_anchor outputs, on
  every level.

  Output [B, sum_l H_l * W_l * A, per_anchor] float32, levels concatenated in the order given,
  within a level row-major (y, x) then anchor: head channel c is anchor c // per_anchor,
  output c % per_anchor (torchvision's layout).
  """
  num_anchors: int
  per_anchor: int  # K classes, or 4 box deltas.
  channels: int = 256
  num_convs: int = 4
  out_bias_init: Any = nn.initializers.zeros
  norm: str = 'none'  # none (paper, torchvision v1) | gn (torchvision v2, detectron2 'GN')
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels):  # levels: list of [B, H_l, W_l, C]
    if self.norm not in ('none', 'gn'):
      raise ValueError(f'Unknown config.model.head_norm {self.norm!r}; expected none or gn.')
    gn = self.norm == 'gn'
    # A bias before GroupNorm would be subtracted again with the group mean.
    convs = [layers.Conv(self.channels, 3, padding=1, use_bias=not gn, dtype=self.dtype,
                         kernel_init=_head_init, name=f'conv{j}') for j in range(self.num_convs)]
    # Shared across levels like the convs; each level is normalised over its own pixels.
    norms = [resnet.GroupNorm(dtype=self.dtype, name=f'norm{j}') if gn else None
             for j in range(self.num_convs)]
    out = layers.Conv(self.num_anchors * self.per_anchor, 3, padding=1, dtype=self.dtype,
                      kernel_init=_head_init, bias_init=self.out_bias_init, name='out')
    constrain = lambda y: sharding.constrain(y, layers.FEATURE_MAP)
    outputs = []
    for x in levels:
      for conv, norm in zip(convs, norms):
        x = conv(constrain(x))
        x = nn.relu(norm(x) if norm is not None else x)
      x = constrain(out(constrain(x)))
      # x: [B, H, W, A * per_anchor]
      outputs.append(x.reshape(x.shape[0], -1, self.per_anchor))
    return jnp.concatenate(outputs, axis=1).astype(jnp.float32)
