"""PoolFormer (Yu et al., "MetaFormer is Actually What You Need for Vision", CVPR 2022), NHWC.

The function is that of the official PyTorch `PoolFormer` in eval mode: a 7x7 stride-4 conv
stem; four stages of blocks
    x = x + ls1 * (avg_pool(GN1(x)) - GN1(x)),   x = x + ls2 * fc2(gelu(fc1(GN2(x))))
with a 3x3 stride-2 conv between stages; a final GroupNorm, global mean pooling and a linear
head. GroupNorm has one group: statistics over (H, W, C) per image, affine per channel, eps
1e-5. Average pooling is 'same' with stride 1 and counts only the pixels inside the image.
Any input size works (convs pad as the official ones).

Parameter names mirror the PyTorch state dict: `network_<i>_<j>` is `network.<i>.<j>` (blocks
of stage i/2 at even i, the downsampling conv at odd i), so the converter is a table of
renames and transposes. Parameters are float32; `dtype` sets the compute dtype.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from strip_mlp.errors import UserError
from strip_mlp.models.strip_mlp_layers import (
    DropPath,
    gelu,
    pool_and_classify,
    torch_bias_init,
    torch_kernel_init,
)

# timm's trunc_normal_(.02):
from strip_mlp.models.strip_mlp_layers import position_table_init as trunc_normal_02

_S_DIMS = (64, 128, 320, 512)
_M_DIMS = (96, 192, 384, 768)
VARIANTS = {
    "poolformer_s12": dict(layers=(2, 2, 6, 2), embed_dims=_S_DIMS, layer_scale_init_value=1e-5),
    "poolformer_s24": dict(layers=(4, 4, 12, 4), embed_dims=_S_DIMS, layer_scale_init_value=1e-5),
    "poolformer_s36": dict(layers=(6, 6, 18, 6), embed_dims=_S_DIMS, layer_scale_init_value=1e-6),
    "poolformer_m36": dict(layers=(6, 6, 18, 6), embed_dims=_M_DIMS, layer_scale_init_value=1e-6),
    "poolformer_m48": dict(layers=(8, 8, 24, 8), embed_dims=_M_DIMS, layer_scale_init_value=1e-6),
}
# Stochastic depth of the official ImageNet recipe per variant (the model's default is 0).
TRAIN_DROP_PATH = {
    "poolformer_s12": 0.1,
    "poolformer_s24": 0.1,
    "poolformer_s36": 0.2,
    "poolformer_m36": 0.3,
    "poolformer_m48": 0.4,
}
GN_EPS = 1e-5


class PoolFormerConfigError(UserError, ValueError):
  """Sizes or inputs that cannot form / feed a PoolFormer; the message says what to change."""


def group_norm(dtype, name=None):
  """PyTorch GroupNorm(1, C): normalises each image over (H, W, C), affine per channel."""
  return nn.GroupNorm(num_groups=1, epsilon=GN_EPS, dtype=dtype, use_fast_variance=False, name=name)


def pool_mixer(x, pool_size: int):
  """avg_pool(x) - x; 'same' stride-1 pooling averaging only in-image pixels. NHWC -> NHWC."""
  pad = ((pool_size // 2, pool_size // 2),) * 2
  return nn.avg_pool(x, (pool_size, pool_size), (1, 1), pad, count_include_pad=False) - x


class ConvEmbed(nn.Module):
  """The official `PatchEmbed`: one conv `proj` with bias (no norm). (N,H,W,I) -> (N,H',W',F)."""

  features: int
  patch: int
  stride: int
  padding: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1] * self.patch**2
    return nn.Conv(
        self.features,
        (self.patch, self.patch),
        (self.stride, self.stride),
        [(self.padding, self.padding)] * 2,
        dtype=self.dtype,
        kernel_init=torch_kernel_init(),
        bias_init=torch_bias_init(fan_in),
        name="proj",
    )(x)


class Mlp(nn.Module):
  """1x1 conv C -> hidden, GELU, 1x1 conv hidden -> C. (N, H, W, C) -> same."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda f, name: nn.Dense(
        f, dtype=self.dtype, kernel_init=trunc_normal_02, bias_init=nn.initializers.zeros, name=name
    )
    return dense(x.shape[-1], "fc2")(gelu(dense(self.hidden, "fc1")(x)))


class PoolFormerBlock(nn.Module):
  """Pooling token mixer and MLP, each pre-normed, layer-scaled and residual. NHWC -> same."""

  mlp_ratio: float = 4.0
  pool_size: int = 3
  drop_path_rate: float = 0.0
  use_layer_scale: bool = True
  layer_scale_init_value: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    drop = DropPath(self.drop_path_rate)

    def scaled(name, y):
      if not self.use_layer_scale:
        return y
      init = nn.initializers.constant(self.layer_scale_init_value)
      return self.param(name, init, (c,)).astype(self.dtype) * y

    y = pool_mixer(group_norm(self.dtype, "norm1")(x), self.pool_size)
    x = x + drop(scaled("layer_scale_1", y), train)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(group_norm(self.dtype, "norm2")(x))
    return x + drop(scaled("layer_scale_2", y), train)


class PoolFormer(nn.Module):
  """PoolFormer classifier / backbone. (N, H, W, 3) float -> logits (N, num_classes) float32.

  num_classes=0: no head; `__call__` returns the pooled features (N, embed_dims[-1]).
  Stochastic depth grows linearly over blocks to `drop_path_rate` (rng 'drop_path').
  """

  layers: Sequence[int] = (2, 2, 6, 2)
  embed_dims: Sequence[int] = _S_DIMS
  mlp_ratios: Sequence[float] = (4, 4, 4, 4)
  pool_size: int = 3
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  use_layer_scale: bool = True
  layer_scale_init_value: float = 1e-5
  dtype: Any = "float32"

  def __post_init__(self):
    for f in ("layers", "embed_dims", "mlp_ratios"):
      object.__setattr__(self, f, tuple(getattr(self, f)))
    _validate(self)
    super().__post_init__()

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    total = sum(self.layers)
    self.patch_embed = ConvEmbed(self.embed_dims[0], 7, 4, 2, dtype)
    stages, first = [], 0
    for i, n in enumerate(self.layers):
      stages.append(
          [
              PoolFormerBlock(
                  self.mlp_ratios[i],
                  self.pool_size,
                  self.drop_path_rate * (first + j) / max(total - 1, 1),
                  self.use_layer_scale,
                  self.layer_scale_init_value,
                  dtype,
                  name=f"network_{2 * i}_{j}",
              )
              for j in range(n)
          ]
      )
      first += n
    self.stages = stages
    self.downsamples = [
        ConvEmbed(self.embed_dims[i + 1], 3, 2, 1, dtype, name=f"network_{2 * i + 1}")
        for i in range(3)
    ]
    self.norm = group_norm(dtype)
    if self.num_classes:
      self.head = nn.Dense(
          self.num_classes,
          dtype=dtype,
          kernel_init=trunc_normal_02,
          bias_init=nn.initializers.zeros,
      )

  def _run_stages(self, x, train, last=3):
    """Outputs of stages 0..last, each (N, H/2^(s+2), W/2^(s+2), embed_dims[s])."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise PoolFormerConfigError(_input_message(tuple(x.shape)))
    x = self.patch_embed(x.astype(jnp.dtype(self.dtype)))
    outs = []
    for s in range(last + 1):
      if s:
        x = self.downsamples[s - 1](x)
      for block in self.stages[s]:
        x = block(x, train)
      outs.append(x)
    return outs

  def stage_features(self, x, train: bool = False, out_indices=(0, 1, 2, 3)):
    """The selected stages' outputs (before any norm), NHWC; see `feature_info`."""
    outs = self._run_stages(x, train, max(out_indices))
    return [outs[i] for i in out_indices]

  def forward_features(self, x, train: bool = False):
    """Final feature map after the final GroupNorm: (N, ~H/32, ~W/32, embed_dims[-1])."""
    return self.norm(self._run_stages(x, train)[-1])

  def forward_head(self, features, pre_logits: bool = False):
    """(N, h, w, C) features -> logits (N, num_classes) f32, or pooled (N, C) f32."""
    head = self.head if self.num_classes else None
    return pool_and_classify(head, features, pre_logits)

  def __call__(self, x, train: bool = False):
    return self.forward_head(self.forward_features(x, train))

  @property
  def feature_info(self):
    return tuple(
        dict(num_chs=c, reduction=4 * 2**s, module=f"network.{2 * s}")
        for s, c in enumerate(self.embed_dims)
    )

  def config_dict(self) -> dict:
    """JSON-able constructor keywords: `PoolFormer(**model.config_dict())` rebuilds it."""
    d = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in ("parent", "name")
    }
    for f in ("layers", "embed_dims", "mlp_ratios"):
      d[f] = list(d[f])
    d["dtype"] = jnp.dtype(d["dtype"]).name
    return d


def _input_message(shape):
  want = f"PoolFormer takes NHWC RGB images (N, H, W, 3), got shape {shape}"
  if len(shape) == 4 and shape[1] == 3:
    return f"{want}, which looks like NCHW: transpose it with x.transpose(0, 2, 3, 1)"
  if len(shape) == 3:
    return f"{want}; add a batch axis for a single image"
  return want


def _validate(m: PoolFormer):
  if not (len(m.layers) == len(m.embed_dims) == len(m.mlp_ratios) == 4):
    raise PoolFormerConfigError(
        "layers, embed_dims and mlp_ratios need 4 entries each (one per stage), got "
        f"{list(m.layers)}, {list(m.embed_dims)}, {list(m.mlp_ratios)}"
    )
  if min(m.layers) < 0 or min(m.embed_dims) <= 0 or min(m.mlp_ratios) <= 0:
    raise PoolFormerConfigError("layers must be >= 0, embed_dims and mlp_ratios > 0")
  if m.pool_size < 1 or m.pool_size % 2 == 0:
    raise PoolFormerConfigError(
        f"pool_size must be odd (the pooling keeps the map size), got {m.pool_size}"
    )
  if m.num_classes < 0:
    raise PoolFormerConfigError(f"num_classes must be >= 0 (0: headless), got {m.num_classes}")


def create_poolformer(variant: str = "poolformer_s12", **overrides) -> PoolFormer:
  """A PoolFormer of a named variant (see VARIANTS) with constructor overrides."""
  if variant not in VARIANTS:
    raise PoolFormerConfigError(
        f"unknown PoolFormer variant {variant!r}; choose one of " f"{sorted(VARIANTS)}"
    )
  return PoolFormer(**{**VARIANTS[variant], **overrides})
