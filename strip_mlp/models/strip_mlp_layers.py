"""The layers of Strip-MLP as Flax modules, NHWC.

The function is the one the released PyTorch weights compute (the official
`models/strip_mlp.py` of github.com/Med-Process/Strip_MLP); parameter names mirror the PyTorch
`state_dict` so that `strip_mlp.convert` is a table of renames and transposes.
Parameters are float32; `dtype` sets the compute dtype (e.g. jnp.bfloat16). Every layer
works on maps of any size; the strip layers, whose weights are tied to the strip length
they were trained at, go through `strip_mlp.models.windows` on maps of another size.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from strip_mlp.models import ops, windows
from strip_mlp.models.batch_norm import BatchNorm

BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
BN_EPS = 1e-5
LN_EPS = 1e-5


# ----------------------------------------------------------------------------- init
def torch_kernel_init(in_axis=-2, out_axis=-1, batch_axis=()):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
  )


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def position_table_init(key, shape, dtype=jnp.float32):
  """timm `trunc_normal_(std=.02)` as released: its cut at +-2 (absolute) is 100 std away,
  so the distribution is N(0, 0.02^2) to within 1e-2000."""
  return 0.02 * jax.random.normal(key, shape, dtype)


def gelu(x):
  """Exact (erf) GELU, as PyTorch's nn.GELU(). Written with erf rather than jax's erfc
  form, which XLA:CPU evaluates several times slower."""
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


class Dense(nn.Module):
  """`nn.Dense` (same parameters, names and function) through `ops.linear`. (..., I) -> (..., O)."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = torch_kernel_init()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = ops.linear(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm over channels: `nn.LayerNorm(use_fast_variance=False)`'s parameters (scale,
  bias: (C,)) and function, statistics in float32 or wider (`ops.channel_moments`).
  (..., C) -> same, in `dtype`."""

  epsilon: float = LN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var = ops.channel_moments(x)
    return ((x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias).astype(self.dtype)


def dense(features, in_features, use_bias=True, dtype=jnp.float32, name=None):
  """A 1x1 conv / linear layer with PyTorch's initialisation."""
  return Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=torch_kernel_init(),
      bias_init=torch_bias_init(in_features),
      name=name,
  )


def batch_norm(train, dtype, name=None):
  return BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, name=name
  )


# ----------------------------------------------------------------------------- layers
class DepthwiseConv(nn.Module):
  """Depthwise 'same' conv, no bias. (N, H, W, C) -> (N, H, W, C)."""

  kernel_size: tuple[int, int]
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", torch_kernel_init(), (*self.kernel_size, 1, x.shape[-1]))
    return ops.depthwise_conv(x, kernel.astype(self.dtype), self.impl)


class PatchConv(nn.Module):
  """Conv with kernel == stride == `patch`, no bias; `groups` as in PyTorch.

  (N, H, W, I) -> (N, H/patch, W/patch, features).
  """

  features: int
  patch: int
  groups: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (self.patch, self.patch, x.shape[-1] // self.groups, self.features)
    kernel = self.param("kernel", torch_kernel_init(), shape)
    return ops.patchify_conv(x, kernel.astype(self.dtype), self.impl)


class RelativePosition(nn.Module):
  """Learned relative-position embedding: returns pos (L, L, D), pos[i, j] = table[j - i + L]."""

  length: int
  features: int

  @nn.compact
  def __call__(self):
    table = self.param(
        "embeddings_table", position_table_init, (2 * self.length + 1, self.features)
    )
    idx = np.arange(self.length)[None, :] - np.arange(self.length)[:, None] + self.length
    return table[idx]


class StripProjection(nn.Module):
  """Strip MLP with cross-strip 3-tap mixing (`proj_h` / `proj_w`), grouped over channels.

  (N, L, L, P, G) -> (N, L, L, P, G); see `ops.strip_mix` for the exact sum and the two
  orders it is computed in (`train` picks one; both give the same function).
  """

  length: int
  groups: int
  along: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    shape = (3, self.length, self.length, self.groups)
    kernel = self.param("kernel", torch_kernel_init(in_axis=1, out_axis=2, batch_axis=(3,)), shape)
    bias = self.param("bias", torch_bias_init(3 * self.length), (self.length, self.groups))
    order = "shift_first" if train else "mix_first"  # the faster one for each on XLA:CPU
    return ops.strip_mix(x, kernel.astype(self.dtype), bias.astype(self.dtype), self.along, order)


def strip_patch(channels: int) -> int:
  """Channels per group split of the strip layer: 2 if C % 80 == 0 else 4 (as released)."""
  return 2 if channels % 80 == 0 else 4


class StripMixing(nn.Module):
  """The Strip MLP layer + cascade group strip mixing on half the block's channels.

  channels: the block's full width C; resolution: the trained strip length L. Acts on
  x (N, H, W, C/2), any H, W: everything up to `proj_w` (the part tied to L) runs on the
  L x L windows of `strip_mlp.models.windows` (at H == W == L on x itself), `fuse_w` on the map.
  In training, `bn` takes its batch statistics over the windows (as MLP-DINO).
  """

  channels: int
  resolution: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    patch = strip_patch(self.channels)
    groups = d // patch
    length = self.resolution
    grouped = lambda t: t.reshape(*t.shape[:3], patch, groups)
    pos_h = RelativePosition(length, d, name="relate_pos_h")().astype(self.dtype)
    pos_w = RelativePosition(length, d, name="relate_pos_w")().astype(self.dtype)
    proj_h = StripProjection(length, groups, "rows", self.dtype, name="proj_h")
    fuse_h = dense(d, 2 * d, use_bias=False, dtype=self.dtype, name="fuse_h")
    bn = batch_norm(train, self.dtype, name="bn")
    proj_w = StripProjection(length, groups, "cols", self.dtype, name="proj_w")

    def strips(u):  # (B, L, L, C/2) -> same
      y = proj_h(grouped(ops.add_to_each(u, pos_h)), train).reshape(u.shape)
      y = fuse_h(jnp.concatenate([y, u], axis=-1))
      v = ops.add_to_each(gelu(bn(y)), pos_w)
      return proj_w(grouped(v), train).reshape(u.shape)

    z = windows.windowed(strips, x, length)
    return dense(d, 2 * d, use_bias=False, dtype=self.dtype, name="fuse_w")(
        jnp.concatenate([x, z], axis=-1)
    )


class StripMLPBlock(nn.Module):
  """`smlp_block`: 1x1 mlp, then strip mixing on one half, re-weighted local
  3x7/7x3 mixing on the other half, then a 1x1 fuse. (N, H, W, C) -> same."""

  resolution: int
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    n, _, _, c = x.shape
    d = c // 2
    x = dense(c, c, dtype=self.dtype, name="mlp_fc")(x)
    x = gelu(batch_norm(train, self.dtype, name="mlp_bn")(x))
    x1, x2 = x[..., :d], x[..., d:]

    x1 = StripMixing(c, self.resolution, self.dtype, name="strip")(x1, train)

    dw = lambda k, name: DepthwiseConv(k, self.depthwise_impl, self.dtype, name=name)
    x_w = dw((3, 7), "fc_h")(x2)
    x_h = dw((7, 3), "fc_w")(x2)
    att = jnp.mean(x_h + x_w + x2, axis=(1, 2))
    att = gelu(dense(d // 2, d, dtype=self.dtype, name="reweight_fc1")(att))
    att = dense(3 * d, d // 2, dtype=self.dtype, name="reweight_fc2")(att)
    att = jax.nn.softmax(att.reshape(n, d, 3), axis=-1)[:, None, None]  # (N,1,1,D,3)
    x2 = x_h * att[..., 0] + x_w * att[..., 1] + x2 * att[..., 2]

    return dense(c, c, use_bias=False, dtype=self.dtype, name="fuse")(
        jnp.concatenate([x1, x2], axis=-1)
    )


class TokenMixing(nn.Module):
  """BN -> GELU -> depthwise 3x3 (`dwsc`), then `smlp_block`. (N, H, W, C) -> same."""

  resolution: int
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = gelu(batch_norm(train, self.dtype, name="dwsc_bn")(x))
    x = DepthwiseConv((3, 3), self.depthwise_impl, self.dtype, name="dwsc")(x)
    return StripMLPBlock(self.resolution, self.depthwise_impl, self.dtype, name="smlp_block")(
        x, train
    )


def spatial_l2_norm(x: jax.Array) -> jax.Array:
  """sqrt(sum over (H, W) of x^2) in float32 (or wider), (N, H, W, C) -> (N, 1, 1, C).

  Its gradient is x / norm, which is 0/0 where a channel's map is exactly 0 (a dead
  channel, a 1x1 map with one zero, bfloat16 underflow). There it is 0, as torch.norm's,
  so such a zero never turns the gradients NaN; the values are those of the plain sqrt.
  """
  sq = jnp.sum(
      jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))), axis=(1, 2), keepdims=True
  )
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


class GRN(nn.Module):
  """Global response normalisation over (H, W). (N, H, W, C) -> same."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.zeros, (1, 1, 1, c)).astype(self.dtype)
    beta = self.param("beta", nn.initializers.zeros, (1, 1, 1, c)).astype(self.dtype)
    g = spatial_l2_norm(x)
    norm = (g / (jnp.mean(g, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)
    return gamma * (x * norm) + beta + x


class ChannelMixing(nn.Module):
  """Depthwise 7x7 -> LayerNorm -> fc1 (C->aC) -> GELU -> GRN -> fc2. (N,H,W,C) -> same."""

  alpha: int = 3
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = DepthwiseConv((7, 7), self.depthwise_impl, self.dtype, name="conv_77")(x)
    x = LayerNorm(LN_EPS, self.dtype, name="layer_norm")(x)
    x = gelu(dense(self.alpha * c, c, dtype=self.dtype, name="fc1")(x))
    x = GRN(self.dtype, name="grn")(x)
    return dense(c, self.alpha * c, dtype=self.dtype, name="fc2")(x)


class DropPath(nn.Module):
  """Stochastic depth per example (timm semantics: kept paths scaled by 1/keep)."""

  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("drop_path"), keep, (x.shape[0],) + (1,) * 3)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """x + drop_path(token_mixing(x)); x + drop_path(channel_mixing(x)). (N, H, W, C) -> same.

  resolution: the strip length L the block's strip layers are trained at.
  """

  resolution: int
  drop_path_rate: float = 0.1
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    drop = DropPath(self.drop_path_rate)
    x = x + drop(
        TokenMixing(self.resolution, self.depthwise_impl, self.dtype, name="token_mixing")(
            x, train
        ),
        train,
    )
    return x + drop(
        ChannelMixing(3, self.depthwise_impl, self.dtype, name="channel_mixing")(x), train
    )


def pool_and_classify(head, features: jax.Array, pre_logits: bool = False) -> jax.Array:
  """(N, h, w, C) features -> global average pool -> `head` logits, float32; the pooled
  (N, C) features when `pre_logits` or when there is no head (None)."""
  pooled = jnp.mean(features, axis=(1, 2))
  if pre_logits or head is None:
    return pooled.astype(jnp.float32)
  return head(pooled).astype(jnp.float32)
