"""Strip-MLP (Cao et al., ICCV 2023) as Flax modules, NHWC.

The function is the one the released PyTorch weights compute (see
`shared/spec/strip_mlp_architecture.md`); parameter names mirror the PyTorch
`state_dict` so that `strip_mlp.convert` is a table of renames and transposes.
Parameters are float32; `dtype` sets the compute dtype (e.g. jnp.bfloat16).
"""
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from strip_mlp import ops

VARIANTS = {
    "tiny_light": dict(embed_dim=80, layers=(2, 2, 6, 2)),   # Strip-MLP-T*
    "tiny": dict(embed_dim=80, layers=(2, 2, 12, 2)),        # Strip-MLP-T
    "small": dict(embed_dim=96, layers=(2, 2, 18, 2)),       # Strip-MLP-S
    "base": dict(embed_dim=112, layers=(2, 2, 18, 2)),       # Strip-MLP-B
}
# The constructor keywords that fix the shapes of the parameters.
ARCHITECTURE_KEYS = ("embed_dim", "layers", "img_size", "num_classes")

BN_MOMENTUM = 0.9   # PyTorch momentum 0.1
BN_EPS = 1e-5
LN_EPS = 1e-5


# ----------------------------------------------------------------------------- init
def torch_kernel_init(in_axis=-2, out_axis=-1, batch_axis=()):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def position_table_init(key, shape, dtype=jnp.float32):
  """timm `trunc_normal_(std=.02)` as released: its cut at +-2 (absolute) is 100 std away,
  so the distribution is N(0, 0.02^2) to within 1e-2000."""
  return 0.02 * jax.random.normal(key, shape, dtype)


def gelu(x):
  """Exact (erf) GELU, as PyTorch's nn.GELU(). Written with erf rather than jax's erfc
  form, which XLA:CPU evaluates several times slower."""
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


def dense(features, in_features, use_bias=True, dtype=jnp.float32, name=None):
  """A 1x1 conv / linear layer with PyTorch's initialisation."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=torch_kernel_init(),
                  bias_init=torch_bias_init(in_features), name=name)


def batch_norm(train, dtype, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      dtype=dtype, use_fast_variance=False, name=name)


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
    table = self.param("embeddings_table", position_table_init,
                       (2 * self.length + 1, self.features))
    idx = np.arange(self.length)[None, :] - np.arange(self.length)[:, None] + self.length
    return table[idx]


class StripProjection(nn.Module):
  """Strip MLP with cross-strip 3-tap mixing (`proj_h` / `proj_w`), grouped over channels.

  (N, L, L, P, G) -> (N, L, L, P, G); see `ops.strip_mix` for the exact sum.
  """
  length: int
  groups: int
  along: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (3, self.length, self.length, self.groups)
    kernel = self.param("kernel", torch_kernel_init(in_axis=1, out_axis=2, batch_axis=(3,)),
                        shape)
    bias = self.param("bias", torch_bias_init(3 * self.length), (self.length, self.groups))
    return ops.strip_mix(x, kernel.astype(self.dtype), bias.astype(self.dtype), self.along)


def strip_patch(channels: int) -> int:
  """Channels per group split of the strip layer: 2 if C % 80 == 0 else 4 (as released)."""
  return 2 if channels % 80 == 0 else 4


class StripMixing(nn.Module):
  """The Strip MLP layer + cascade group strip mixing on half the block's channels.

  channels: the block's full width C; acts on x (N, L, L, C/2).
  """
  channels: int
  resolution: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    n, h, w, d = x.shape
    patch = strip_patch(self.channels)
    groups = d // patch
    grouped = lambda t: t.reshape(n, h, w, patch, groups)
    pos_h = RelativePosition(self.resolution, d, name="relate_pos_h")().astype(self.dtype)
    pos_w = RelativePosition(self.resolution, d, name="relate_pos_w")().astype(self.dtype)

    y = StripProjection(self.resolution, groups, "rows", self.dtype, name="proj_h")(
        grouped(x + pos_h)).reshape(x.shape)
    y = dense(d, 2 * d, use_bias=False, dtype=self.dtype, name="fuse_h")(
        jnp.concatenate([y, x], axis=-1))
    v = gelu(batch_norm(train, self.dtype, name="bn")(y)) + pos_w
    z = StripProjection(self.resolution, groups, "cols", self.dtype, name="proj_w")(
        grouped(v)).reshape(x.shape)
    return dense(d, 2 * d, use_bias=False, dtype=self.dtype, name="fuse_w")(
        jnp.concatenate([x, z], axis=-1))


class StripMLPBlock(nn.Module):
  """`smlp_block`: 1x1 mlp, then strip mixing on one half, re-weighted local
  3x7/7x3 mixing on the other half, then a 1x1 fuse. (N, L, L, C) -> same."""
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
        jnp.concatenate([x1, x2], axis=-1))


class TokenMixing(nn.Module):
  """BN -> GELU -> depthwise 3x3 (`dwsc`), then `smlp_block`. (N, L, L, C) -> same."""
  resolution: int
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = gelu(batch_norm(train, self.dtype, name="dwsc_bn")(x))
    x = DepthwiseConv((3, 3), self.depthwise_impl, self.dtype, name="dwsc")(x)
    return StripMLPBlock(self.resolution, self.depthwise_impl, self.dtype,
                         name="smlp_block")(x, train)


def spatial_l2_norm(x: jax.Array) -> jax.Array:
  """sqrt(sum over (H, W) of x^2) in float32 (or wider), (N, H, W, C) -> (N, 1, 1, C).

  Its gradient is x / norm, which is 0/0 where a channel's map is exactly 0 (a dead
  channel, a 1x1 map with one zero, bfloat16 underflow). There it is 0, as torch.norm's,
  so such a zero never turns the gradients NaN; the values are those of the plain sqrt.
  """
  sq = jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))), axis=(1, 2),
               keepdims=True)
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
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, use_fast_variance=False,
                     name="layer_norm")(x)
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
  """x + drop_path(token_mixing(x)); x + drop_path(channel_mixing(x))."""
  resolution: int
  drop_path_rate: float = 0.1
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    drop = DropPath(self.drop_path_rate)
    x = x + drop(TokenMixing(self.resolution, self.depthwise_impl, self.dtype,
                             name="token_mixing")(x, train), train)
    return x + drop(ChannelMixing(3, self.depthwise_impl, self.dtype,
                                  name="channel_mixing")(x), train)


# ----------------------------------------------------------------------------- network
class StripMLP(nn.Module):
  """Strip-MLP classifier. (N, img_size, img_size, 3) float -> logits (N, num_classes) f32.

  Stage outputs and pooled features are sown into the 'intermediates' collection
  (`stage1`..`stage4`, `pooled`). Requires rng 'drop_path' when train and
  drop_path_rate > 0.
  """
  embed_dim: int = 80
  layers: Sequence[int] = (2, 2, 6, 2)
  img_size: int = 224
  num_classes: int = 1000
  drop_path_rate: float = 0.1
  dtype: Any = "float32"
  depthwise_impl: str = "auto"
  patchify_impl: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
    validate_architecture(self.embed_dim, self.layers, self.img_size, self.num_classes)
    super().__post_init__()

  def config_dict(self) -> dict:
    """JSON-able constructor keywords: `StripMLP(**model.config_dict())` rebuilds it."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in ("parent", "name")}
    d["layers"] = list(d["layers"])
    d["dtype"] = jnp.dtype(d["dtype"]).name
    return d

  @nn.compact
  def __call__(self, x, train: bool = False):
    r = self.img_size
    if x.ndim != 4 or tuple(x.shape[1:]) != (r, r, 3):
      raise ValueError(_input_shape_message(tuple(x.shape), r))
    dtype = jnp.dtype(self.dtype)
    e = self.embed_dim
    patch = lambda feat, p, name, groups=1: PatchConv(feat, p, groups, self.patchify_impl,
                                                      dtype, name=name)

    def stage(x, s):
      for i in range(self.layers[s - 1]):
        x = Block(r // 4 // 2 ** (s - 1), self.drop_path_rate, self.depthwise_impl, dtype,
                  name=f"blocks{s}_{i}")(x, train)
      self.sow("intermediates", f"stage{s}", x)
      return x

    x = patch(e, 4, "patch_embed")(x.astype(dtype))
    x = stage(x, 1)
    x = patch(2 * e, 2, "merging1")(x)
    a = patch(4 * e, 2, "conv_s1_28", groups=2 * e)(x)
    b = patch(8 * e, 2, "conv_s1_14", groups=4 * e)(a)
    x = stage(x, 2)
    x = patch(4 * e, 2, "merging2")(x)
    c = patch(8 * e, 2, "conv_s2_14", groups=4 * e)(x)
    x = stage(x + a, 3)
    x = patch(8 * e, 2, "merging3")(x)
    x = stage(x + b + c, 4)
    x = batch_norm(train, dtype, name="norm")(x)
    pooled = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "pooled", pooled)
    logits = dense(self.num_classes, 8 * e, dtype=dtype, name="head")(pooled)
    return logits.astype(jnp.float32)


def _input_shape_message(shape: tuple, size: int) -> str:
  """What is wrong with an input of `shape` for a model of `size` px, and what to do."""
  want = f"StripMLP was built for images of shape (N, {size}, {size}, 3) (NHWC) but got {shape}"
  if len(shape) != 4:
    return f"{want}; give a batch of NHWC images (add a batch axis for a single image)"
  if shape[1] in (1, 3) and shape[3] not in (1, 3):
    return f"{want}, which looks like NCHW: transpose it with x.transpose(0, 2, 3, 1)"
  if shape[3] != 3:
    return f"{want}; give RGB images with 3 channels last"
  return f"{want}; resize the input or build the model with img_size={shape[1]}"


def validate_architecture(embed_dim, layers, img_size, num_classes):
  """Raises ValueError with what to change when the sizes cannot form a Strip-MLP."""
  if len(layers) != 4 or any(n < 0 for n in layers):
    raise ValueError(f"layers must be 4 non-negative block counts, got {layers}")
  if img_size <= 0 or img_size % 32:
    raise ValueError(f"img_size must be a positive multiple of 32, got {img_size}")
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  for s in range(4):
    c = embed_dim * 2 ** s
    if c <= 0 or (c // 2) % strip_patch(c) or c % 4:
      raise ValueError(
          f"embed_dim={embed_dim} gives {c} channels in stage {s + 1}, which the strip "
          "layer cannot split into groups; use a multiple of 8 (e.g. 16, 40, 80, 96, 112)")


def create_model(variant: str = "tiny_light", **overrides) -> StripMLP:
  """A StripMLP of a named variant ('tiny_light', 'tiny', 'small', 'base') with overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)} or "
                     "build StripMLP(embed_dim=..., layers=...) directly")
  return StripMLP(**{**VARIANTS[variant], **overrides})


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
