"""RaftMLP (Tatsunami & Taki, "RaftMLP: How Much Can Be Done Without Attention and with Less
Spatial Locality?", ACCV 2022) as Flax modules, NHWC.

The function is that of the official PyTorch `RaftMLP` in eval mode in the configuration of
its released models: serial permuted token mixing, cross-scale MLP embedding, no shortcut
heads. Level i (stride p = its first, smallest embedding kernel):
  embedding: for each kernel k, the k x k patches at stride p with padding (k - p) / 2,
    features ordered (channel, row, column) as torch's Unfold, concatenated over the
    kernels and projected by one linear layer `fc` -> (N, H/p, W/p, C); computed here as
    one strided conv per kernel (the same sum);
  depth x [vertical, horizontal, channel] blocks, each x + fc2(gelu(fc1(LayerNorm(x)))).
The C channels form r rafts of C/r: channel c = j * C/r + o (raft j, member o). The vertical
block's MLP mixes, for each column and member o, the r*h values indexed j*h + row; the
horizontal one the r*w values j*w + column for each row and member. All LayerNorms
normalise over the C channels of a pixel (eps 1e-5); the token blocks' affine parameters
are kept in the official (member, raft) order, index o*r + j (`RaftLayerNorm`).
Then a final LayerNorm, the mean over pixels and a linear classifier.

The token MLPs fix each level's map size, so a model is built for one `img_size` (the
official code bicubically resizes other sizes inside every block; that is not reproduced).
Stochastic depth applies the same `drop_path_rate` to every block, as the official code.
Parameters are float32; `dtype` sets the compute dtype.
"""

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from strip_mlp.errors import UserError
from strip_mlp.models.strip_mlp_layers import (
    DropPath,
    dense,
    gelu,
    pool_and_classify,
    torch_bias_init,
    torch_kernel_init,
)

_KERNELS = ((4, 8), (2, 4), (2, 4), (2,))
VARIANTS = {  # the official code's ImageNet settings of RaftMLP-S, -M and -L
    "raftmlp_s": dict(
        dims=(64, 128, 256, 512),
        depths=(2, 2, 6, 2),
        raft_sizes=(2, 2, 2, 2),
        embedding_kernels=_KERNELS,
    ),
    "raftmlp_m": dict(
        dims=(96, 192, 384, 768),
        depths=(2, 2, 6, 2),
        raft_sizes=(2, 2, 2, 2),
        embedding_kernels=_KERNELS,
    ),
    "raftmlp_l": dict(
        dims=(128, 192, 512, 1024),
        depths=(2, 2, 6, 2),
        raft_sizes=(2, 2, 2, 2),
        embedding_kernels=_KERNELS,
    ),
}
# Stochastic depth of the official ImageNet recipe per variant (the model's default is 0).
TRAIN_DROP_PATH = {variant: 0.1 for variant in VARIANTS}
LN_EPS = 1e-5
# Axes of the raft-split map (N, H, W, r, C/r) gathered for each token MLP, vector axes last.
_TOKEN_AXES = {"vertical": (0, 2, 4, 3, 1), "horizontal": (0, 1, 4, 3, 2)}


class RaftMLPConfigError(UserError, ValueError):
  """Sizes or inputs that cannot form / feed a RaftMLP; the message says what to change."""


def layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class RaftLayerNorm(nn.Module):
  """LayerNorm over C whose scale/bias entry o*r + j belongs to channel j*C/r + o. NHWC."""

  raft_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, r = x.shape[-1], self.raft_size
    y = nn.LayerNorm(
        epsilon=LN_EPS, dtype=self.dtype, use_bias=False, use_scale=False, use_fast_variance=False
    )(x)
    in_channel_order = lambda p: p.reshape(c // r, r).T.reshape(c).astype(self.dtype)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return y * in_channel_order(scale) + in_channel_order(bias)


class LinearParams(nn.Module):
  """A PyTorch-initialised linear layer's kernel (in, out) and bias (out,), not applied."""

  in_features: int
  out_features: int

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", torch_kernel_init(), (self.in_features, self.out_features))
    bias = self.param("bias", torch_bias_init(self.in_features), (self.out_features,))
    return kernel, bias


class CrossScaleEmbedding(nn.Module):
  """Multi-kernel patch embedding. (N, H, W, I) -> (N, H/p, W/p, features), p = kernels[0]."""

  features: int
  kernels: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c_in, stride = x.shape[-1], self.kernels[0]
    kernel, bias = LinearParams(c_in * sum(k * k for k in self.kernels), self.features, name="fc")()
    out, start = bias.astype(self.dtype), 0
    for k in self.kernels:
      # Unfold's feature order is (channel, row, column): its rows -> an HWIO conv kernel.
      w = kernel[start : start + c_in * k * k].reshape(c_in, k, k, self.features)
      w, start = w.transpose(1, 2, 0, 3), start + c_in * k * k
      pad = (k - stride) // 2
      out = out + lax.conv_general_dilated(
          x,
          w.astype(self.dtype),
          (stride, stride),
          [(pad, pad)] * 2,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    return out


class MixingBlock(nn.Module):
  """x + drop_path(fc2(gelu(fc1(LayerNorm(x))))) along `axis`. (N, H, W, C) -> same.

  axis 'channel': the MLP acts on the C channels of each pixel. 'vertical' / 'horizontal':
  on the r*H (r*W) values of each raft member's column (row), index j*H + row.
  """

  axis: str
  raft_size: int = 1
  expansion: int = 4
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    n, h, w, c = x.shape
    if self.axis == "channel":
      y = layer_norm(self.dtype, "norm")(x)
    else:
      y = RaftLayerNorm(self.raft_size, self.dtype, name="norm")(x)
      perm = _TOKEN_AXES[self.axis]
      y = y.reshape(n, h, w, self.raft_size, c // self.raft_size).transpose(perm)
      grouped = y.shape
      y = y.reshape(grouped[:3] + (grouped[3] * grouped[4],))
    d = y.shape[-1]
    y = gelu(dense(d * self.expansion, d, dtype=self.dtype, name="fc1")(y))
    y = dense(d, d * self.expansion, dtype=self.dtype, name="fc2")(y)
    if self.axis != "channel":
      y = y.reshape(grouped).transpose(np.argsort(perm)).reshape(n, h, w, c)
    return x + DropPath(self.drop_path_rate)(y, train)


class RaftLayer(nn.Module):
  """Vertical raft mixing, horizontal raft mixing, channel mixing. (N, H, W, C) -> same."""

  raft_size: int
  token_expansion: int
  channel_expansion: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for axis in ("vertical", "horizontal"):
      x = MixingBlock(
          axis, self.raft_size, self.token_expansion, self.drop_path_rate, self.dtype, name=axis
      )(x, train)
    return MixingBlock(
        "channel", 1, self.channel_expansion, self.drop_path_rate, self.dtype, name="channel"
    )(x, train)


class RaftLevel(nn.Module):
  """Cross-scale embedding, then `depth` raft layers. (N, H, W, I) -> (N, H/p, W/p, dim)."""

  dim: int
  depth: int
  raft_size: int
  kernels: Sequence[int]
  token_expansion: int = 2
  channel_expansion: int = 4
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = CrossScaleEmbedding(self.dim, self.kernels, self.dtype, name="embedding")(x)
    for d in range(self.depth):
      x = RaftLayer(
          self.raft_size,
          self.token_expansion,
          self.channel_expansion,
          self.drop_path_rate,
          self.dtype,
          name=f"blocks_{d}",
      )(x, train)
    return x


class RaftMLP(nn.Module):
  """RaftMLP classifier / backbone. (N, img_size, img_size, 3) -> logits (N, num_classes) f32.

  Level i has `dims[i]` channels, `depths[i]` raft layers, rafts of `raft_sizes[i]` and the
  patch kernels `embedding_kernels[i]` (the first, smallest one is its stride). num_classes=0:
  no classifier; `__call__` returns the pooled features (N, dims[-1]).
  """

  dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 6, 2)
  raft_sizes: Sequence[int] = (2, 2, 2, 2)
  embedding_kernels: Sequence[Sequence[int]] = _KERNELS
  img_size: int = 224
  num_classes: int = 1000
  token_expansion_factor: int = 2
  channel_expansion_factor: int = 4
  drop_path_rate: float = 0.0
  dtype: Any = "float32"

  def __post_init__(self):
    for f in ("dims", "depths", "raft_sizes"):
      object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
    object.__setattr__(
        self, "embedding_kernels", tuple(tuple(int(k) for k in ks) for ks in self.embedding_kernels)
    )
    _validate(self)
    super().__post_init__()

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.levels = [
        RaftLevel(
            dim,
            depth,
            raft,
            kernels,
            self.token_expansion_factor,
            self.channel_expansion_factor,
            self.drop_path_rate,
            dtype,
            name=f"levels_{i}",
        )
        for i, (dim, depth, raft, kernels) in enumerate(
            zip(self.dims, self.depths, self.raft_sizes, self.embedding_kernels)
        )
    ]
    self.norm = layer_norm(dtype)
    if self.num_classes:
      self.classifier = dense(self.num_classes, self.dims[-1], dtype=dtype)

  def _run_levels(self, x, train, last):
    """Outputs of levels 0..last, each (N, img_size/reduction, img_size/reduction, dim)."""
    want = (self.img_size, self.img_size, 3)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise RaftMLPConfigError(_input_message(tuple(x.shape), self.img_size))
    x = x.astype(jnp.dtype(self.dtype))
    outs = []
    for level in self.levels[: last + 1]:
      x = level(x, train)
      outs.append(x)
    return outs

  def stage_features(self, x, train: bool = False, out_indices=None):
    """The selected levels' outputs (before any norm), NHWC; see `feature_info`."""
    out_indices = range(len(self.dims)) if out_indices is None else out_indices
    outs = self._run_levels(x, train, max(out_indices))
    return [outs[i] for i in out_indices]

  def forward_features(self, x, train: bool = False):
    """Final feature map after the final LayerNorm: (N, h, w, dims[-1])."""
    return self.norm(self._run_levels(x, train, len(self.dims) - 1)[-1])

  def forward_head(self, features, pre_logits: bool = False):
    """(N, h, w, C) features -> logits (N, num_classes) f32, or pooled (N, C) f32."""
    head = self.classifier if self.num_classes else None
    return pool_and_classify(head, features, pre_logits)

  def __call__(self, x, train: bool = False):
    return self.forward_head(self.forward_features(x, train))

  @property
  def feature_info(self):
    reductions = np.cumprod([ks[0] for ks in self.embedding_kernels])
    return tuple(
        dict(num_chs=c, reduction=int(r), module=f"levels.{i}")
        for i, (c, r) in enumerate(zip(self.dims, reductions))
    )

  def config_dict(self) -> dict:
    """JSON-able constructor keywords: `RaftMLP(**model.config_dict())` rebuilds it."""
    d = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in ("parent", "name")
    }
    for f in ("dims", "depths", "raft_sizes"):
      d[f] = list(d[f])
    d["embedding_kernels"] = [list(ks) for ks in d["embedding_kernels"]]
    d["dtype"] = jnp.dtype(d["dtype"]).name
    return d


def _input_message(shape, size):
  want = f"RaftMLP was built for images of shape (N, {size}, {size}, 3) (NHWC), got {shape}"
  if len(shape) == 4 and shape[1] == 3 and shape[3] != 3:
    return f"{want}, which looks like NCHW: transpose it with x.transpose(0, 2, 3, 1)"
  if len(shape) != 4:
    return f"{want}; give a batch of NHWC images (add a batch axis for a single image)"
  return (
      f"{want}; its token MLPs are tied to the map sizes: resize the input or build the "
      f"model with img_size={shape[1]} (and new weights)"
  )


def level_sizes(img_size: int, embedding_kernels) -> list:
  """Map size of each level: img_size divided by the strides so far (must divide)."""
  sizes, size = [], img_size
  total_stride = math.prod(ks[0] for ks in embedding_kernels)
  for i, ks in enumerate(embedding_kernels):
    if size <= 0 or size % ks[0]:
      raise RaftMLPConfigError(
          f"img_size={img_size} gives a {size}px map before level {i}, which its stride "
          f"{ks[0]} does not divide; use a positive multiple of {total_stride}"
      )
    size //= ks[0]
    sizes.append(size)
  return sizes


def _validate(m: RaftMLP):
  n = len(m.dims)
  if not n or any(len(v) != n for v in (m.depths, m.raft_sizes, m.embedding_kernels)):
    raise RaftMLPConfigError(
        "dims, depths, raft_sizes and embedding_kernels need one entry per level, got "
        f"{list(m.dims)}, {list(m.depths)}, {list(m.raft_sizes)}, {m.embedding_kernels}"
    )
  for i, (dim, raft, ks) in enumerate(zip(m.dims, m.raft_sizes, m.embedding_kernels)):
    if dim <= 0 or raft <= 0 or dim % raft:
      raise RaftMLPConfigError(f"level {i}: raft_size {raft} must divide dims {dim}")
    if not ks or any(k % ks[0] or (k - ks[0]) % 2 or k < ks[0] for k in ks):
      raise RaftMLPConfigError(
          f"level {i}: embedding_kernels {list(ks)} must start with the stride p and hold "
          "multiples k of p with k - p even (the patches of every kernel must tile alike)"
      )
  if min(m.depths) < 0 or m.num_classes < 0:
    raise RaftMLPConfigError("depths and num_classes must be >= 0 (num_classes 0: headless)")
  level_sizes(m.img_size, m.embedding_kernels)


def create_raftmlp(variant: str = "raftmlp_s", **overrides) -> RaftMLP:
  """A RaftMLP of a named variant (see VARIANTS; 224 px, 1000 classes) with overrides."""
  if variant not in VARIANTS:
    raise RaftMLPConfigError(
        f"unknown RaftMLP variant {variant!r}; choose one of " f"{sorted(VARIANTS)}"
    )
  return RaftMLP(**{**VARIANTS[variant], **overrides})
