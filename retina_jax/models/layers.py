"""Conv2d with PyTorch's explicit padding, and a CPU backward pass built from matrix products.

On CPU, XLA lowers the weight gradient of a convolution to a generic loop several times slower
than a GEMM of the same size (benchmarks/RESULTS.md). So on CPU:
- 1x1 convs are matrix products outright (forward and both gradients are GEMMs);
- k x k convs keep XLA's forward and input gradient, and get their weight gradient as the sum
  over the k*k taps of x_shifted^T @ dy.
All of these GEMMs take 2-D [pixels, channels] views (`_pixels_contraction`, `_conv1x1`'s
explicit VJP): as 4-D einsums, their autodiff makes XLA CPU copy gradients into a transposed
layout first.
Elsewhere the native convolution is used: on GPUs with its autodiff, on TPU with a float32
weight gradient (`native_weight_grad`), so that the data-parallel all-reduce sums float32.
Same parameters either way: 'kernel' [k, k, Cin, Cout] (HWIO) and 'bias' [Cout], as flax's
nn.Conv.

`FEATURE_MAP` names the axes of the models' feature maps for `sharding.constrain`.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMS = ('NHWC', 'HWIO', 'NHWC')

# Logical axes of every feature map [B, H, W, C]; sharding.LOGICAL_RULES maps them to the mesh.
FEATURE_MAP = ('batch', 'height', 'width', 'channels')


def _xla_conv(x, kernel, stride: int, pad: int):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=_DIMS)


def _weight_grad(x, dy, k: int, stride: int, pad: int):
  """dL/dkernel [k, k, C, O] of a k x k conv from x [B, H, W, C] and dy [B, Ho, Wo, O]."""
  b, ho, wo, _ = dy.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  taps = []
  for i in range(k):
    for j in range(k):
      # The input pixels tap (i, j) met, one per output pixel: [B, Ho, Wo, C].
      xs = jax.lax.slice(xp, (0, i, j, 0),
                         (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, x.shape[3]),
                         (1, stride, stride, 1))
      taps.append(_pixels_contraction(xs, dy))
  return jnp.stack(taps).reshape(k, k, x.shape[3], dy.shape[3])


def _pixels_contraction(x, dy):
  """sum over pixels of x[p, c] * dy[p, o] -> [C, O], as one [C, P] x [P, O] GEMM on 2-D views.

  Written with 2-D operands so that XLA CPU hands it to its GEMM library as is; in the 4-D
  einsum form it copies the (larger) gradient into a transposed layout first.
  """
  c, o = x.shape[-1], dy.shape[-1]
  return jax.lax.dot_general(x.reshape(-1, c), dy.reshape(-1, o), (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv1x1(x, kernel, stride: int):
  """A 1x1 conv as one [P, C] x [C, O] GEMM on the (strided) pixels; its VJP is two GEMMs."""
  xs = x[:, ::stride, ::stride]
  y = jax.lax.dot(xs.reshape(-1, x.shape[-1]), kernel[0, 0], preferred_element_type=jnp.float32)
  return y.reshape(*xs.shape[:3], kernel.shape[-1]).astype(x.dtype)


def _conv1x1_fwd(x, kernel, stride):
  return _conv1x1(x, kernel, stride), (x, kernel)


def _conv1x1_bwd(stride, residuals, dy):
  x, kernel = residuals
  xs = x[:, ::stride, ::stride]
  dxs = jax.lax.dot(dy.reshape(-1, dy.shape[-1]), kernel[0, 0].T.astype(dy.dtype),
                    preferred_element_type=jnp.float32).reshape(xs.shape)
  if stride == 1:
    dx = dxs
  else:
    dx = jnp.zeros_like(x).at[:, ::stride, ::stride].set(dxs.astype(x.dtype))
  dw = _pixels_contraction(xs, dy)[None, None].astype(kernel.dtype)
  return dx.astype(x.dtype), dw


_conv1x1.defvjp(_conv1x1_fwd, _conv1x1_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm_wgrad(x, kernel, stride: int, pad: int):
  return _xla_conv(x, kernel, stride, pad)


def _conv_fwd(x, kernel, stride, pad):
  return _xla_conv(x, kernel, stride, pad), (x, kernel)


def _conv_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, stride, pad), x)
  (dx,) = input_vjp(dy)
  dw = _weight_grad(x, dy, kernel.shape[0], stride, pad).astype(kernel.dtype)
  return dx, dw


_conv_gemm_wgrad.defvjp(_conv_fwd, _conv_bwd)


def native_weight_grad(x, dy, k: int, stride: int, pad: int):
  """dL/dkernel [k, k, C, O] of a k x k conv as one native convolution, accumulated and
  returned in float32 whatever the dtype of x and dy.

  The same convolution JAX's autodiff emits (x's channels as the batch, its batch as the
  features, dy dilated by the stride), but with a float32 result: the partial sums over each
  device's images are then all-reduced across the data axis in float32, where with the
  bfloat16 result of autodiff XLA all-reduces bfloat16 gradients (as torchvision's DDP does
  not).
  """
  h, w = x.shape[1:3]
  ho, wo = dy.shape[1:3]
  padding = ((pad, (ho - 1) * stride + k - h - pad), (pad, (wo - 1) * stride + k - w - pad))
  return jax.lax.conv_general_dilated(
      x, dy, window_strides=(1, 1), padding=padding, rhs_dilation=(stride, stride),
      dimension_numbers=('CHWN', 'IHWO', 'HWNC'), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_conv(x, kernel, stride: int, pad: int):
  """The native convolution of x with the float32 `kernel` cast to x's dtype; its kernel
  gradient is float32 (native_weight_grad)."""
  return _xla_conv(x, kernel.astype(x.dtype), stride, pad)


def _native_conv_fwd(x, kernel, stride, pad):
  return _native_conv(x, kernel, stride, pad), (x, kernel)


def _native_conv_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel.astype(x.dtype), stride, pad), x)
  (dx,) = input_vjp(dy)
  dw = native_weight_grad(x, dy, kernel.shape[0], stride, pad)
  return dx, dw.astype(kernel.dtype)


_native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


def conv2d(x, kernel, stride: int = 1, pad: int = 0):
  """x [B, H, W, C], kernel [k, k, C, O] -> [B, (H + 2 pad - k) // stride + 1, ..., O].

  Zero padding of `pad` on every side, exactly as PyTorch's Conv2d(padding=pad). The kernel
  (float32 parameters) is cast to x's dtype for the product; its gradient comes back in the
  kernel's dtype, accumulated in float32 on TPU (native_weight_grad). On GPUs the weight
  gradient stays autodiff's (in x's dtype, then cast): cuDNN may not run a bfloat16
  convolution with a float32 result natively (not measured).
  """
  if kernel.shape[0] == 1 and kernel.shape[1] == 1 and pad == 0:
    cpu = lambda x_, k_: _conv1x1(x_, k_.astype(x_.dtype), stride)
  else:
    cpu = lambda x_, k_: _conv_gemm_wgrad(x_, k_.astype(x_.dtype), stride, pad)
  # Chosen when lowering for each platform, not from the host's backend at trace time: an
  # ahead-of-time compile for TPU made on a CPU host, or a jax.export for ('cpu', 'cuda', 'tpu'),
  # gets the native convolution on the accelerators. Lowered for one platform, only its branch
  # is emitted.
  return jax.lax.platform_dependent(
      x, kernel, cpu=cpu, tpu=lambda x_, k_: _native_conv(x_, k_, stride, pad),
      default=lambda x_, k_: _xla_conv(x_, k_.astype(x_.dtype), stride, pad))


class Conv(nn.Module):
  """A square conv with PyTorch's symmetric padding (never XLA's asymmetric 'SAME')."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, Cin] -> [B, Ho, Wo, features]
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel, self.stride, self.padding)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
      # Added in float32 (fused into the convolution) so that the bias gradient is summed over
      # pixels and devices in float32, as the kernel's is.
      y = (y.astype(jnp.float32) + bias).astype(self.dtype)
    return y
