"""MS-MLP (Zheng et al., 'Mixing and Shifting: Exploiting Global and Local Dependencies in
Vision MLPs', 2022) as Flax modules, NHWC.

The function is that of the official PyTorch release; parameter names mirror its
`state_dict` (`layers_0/blocks_1/dwconv_lr_2/kernel` <-> `layers.0.blocks.1.dwconv_lr.2.weight`)
so that `strip_mlp.convert.msmlp` is a table of renames and transposes.
Parameters are float32; `dtype` sets the compute dtype (e.g. jnp.bfloat16).

A mix-shift block splits its C channels into len(shift_dist) groups as `torch.chunk` does
(ceil(C / groups) channels each, the last group smaller), rolls group i circularly by
shift_dist[i] along W (then a depthwise k_i x k_i conv, "lr") and along H (another one,
"td"), adds the two, and applies LayerNorm -> Linear -> GELU -> Linear -> layer scale as
a residual branch. Stages are joined by patch embeddings (2x2 stride-2 conv + LayerNorm).
The final LayerNorm acts on the pooled features, after the global mean.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from strip_mlp.models import ops
from strip_mlp.errors import UserError
from strip_mlp.models.strip_mlp_layers import DropPath, gelu, torch_bias_init, torch_kernel_init

RELEASED_SHIFT_DIST = (-2, -1, 0, 1, 2)
RELEASED_MIX_SIZE = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
VARIANTS = {  # the released configurations, with their training drop-path rates
    "msmlp_t": dict(embed_dim=96, depths=(3, 3, 9, 3), drop_path_rate=0.1),
    "msmlp_s": dict(embed_dim=96, depths=(3, 3, 27, 3), drop_path_rate=0.4),
    "msmlp_b": dict(embed_dim=128, depths=(3, 3, 27, 3), drop_path_rate=0.5),
}
LN_EPS = 1e-6


class ArchitectureError(UserError, ValueError):
  """Sizes that cannot form an MS-MLP, or an input the model cannot take."""


def chunk_sizes(channels: int, groups: int) -> tuple[int, ...]:
  """Channel counts of `torch.chunk(x, groups, dim=channels)`: ceil(C / groups) each, the
  last one smaller. May give fewer than `groups` chunks (16 channels, 5 groups -> 4 x 4)."""
  size = -(-channels // groups)
  return tuple(min(size, channels - start) for start in range(0, channels, size))


def linear(features, dtype, name):
  """nn.Linear as the release initialises it: weight N(0, 0.02^2) (its trunc_normal_ cut
  at +-2 absolute is 100 std away), bias 0."""
  return nn.Dense(
      features,
      dtype=dtype,
      kernel_init=nn.initializers.normal(0.02),
      bias_init=nn.initializers.zeros,
      name=name,
  )


def layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class DepthwiseConv(nn.Module):
  """Depthwise k x k 'same' conv with bias (zero padding). (N, H, W, C) -> same."""

  kernel_size: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", torch_kernel_init(), (k, k, 1, c))
    bias = self.param("bias", torch_bias_init(k * k), (c,))
    return ops.depthwise_conv(x, kernel.astype(self.dtype), self.impl) + bias.astype(self.dtype)


class PatchConv(nn.Module):
  """Conv with kernel == stride == `patch`, with bias. (N, H, W, I) -> (N, H/p, W/p, O)."""

  features: int
  patch: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, i = self.patch, x.shape[-1]
    kernel = self.param("kernel", torch_kernel_init(), (p, p, i, self.features))
    bias = self.param("bias", torch_bias_init(p * p * i), (self.features,))
    return ops.patchify_conv(x, kernel.astype(self.dtype), self.impl) + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """`proj` (patch conv) then, when `norm`, LayerNorm over channels. NHWC -> NHWC / patch."""

  features: int
  patch: int
  norm: bool = True
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = PatchConv(self.features, self.patch, self.impl, self.dtype, name="proj")(x)
    return layer_norm(self.dtype, name="norm")(x) if self.norm else x


class MixShiftBlock(nn.Module):
  """x + drop_path(gamma * mlp(norm(mix_lr(shift_w(x)) + mix_td(shift_h(x))))).

  Group i of the channels (see `chunk_sizes`) is rolled by shift_dist[i] and mixed by
  depthwise convs of size mix_size[i]. (N, H, W, C) -> (N, H, W, C).
  """

  shift_dist: tuple[int, ...]
  mix_size: tuple[int, ...]
  mlp_ratio: float = 4.0
  layer_scale_init_value: float = 1e-6
  drop_path_rate: float = 0.0
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    lr, td, start = [], [], 0
    for i, size in enumerate(chunk_sizes(c, len(self.shift_dist))):
      group, shift, k = x[..., start : start + size], self.shift_dist[i], self.mix_size[i]
      start += size
      conv = lambda kind: DepthwiseConv(
          k, self.depthwise_impl, self.dtype, name=f"dwconv_{kind}_{i}"
      )
      lr.append(conv("lr")(jnp.roll(group, shift, axis=2)))
      td.append(conv("td")(jnp.roll(group, shift, axis=1)))
    y = jnp.concatenate(lr, axis=-1) + jnp.concatenate(td, axis=-1)
    y = layer_norm(self.dtype, name="norm")(y)
    y = gelu(linear(int(self.mlp_ratio * c), self.dtype, name="pwconv1")(y))
    y = linear(c, self.dtype, name="pwconv2")(y)
    if self.layer_scale_init_value > 0:
      init = nn.initializers.constant(self.layer_scale_init_value)
      y = y * self.param("gamma", init, (c,)).astype(self.dtype)
    return x + DropPath(self.drop_path_rate)(y, train)


class Stage(nn.Module):
  """`blocks_0..` at width `dim`, then (unless last) `downsample` to 2*dim at half size.

  Returns (stage output (N, H, W, dim), input of the next stage).
  """

  dim: int
  shift_dist: tuple[int, ...]
  mix_size: tuple[int, ...]
  drop_path_rates: tuple[float, ...]
  mlp_ratio: float = 4.0
  layer_scale_init_value: float = 1e-6
  downsample: bool = True
  depthwise_impl: str = "auto"
  patchify_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i, rate in enumerate(self.drop_path_rates):
      x = MixShiftBlock(
          self.shift_dist,
          self.mix_size,
          self.mlp_ratio,
          self.layer_scale_init_value,
          rate,
          self.depthwise_impl,
          self.dtype,
          name=f"blocks_{i}",
      )(x, train)
    if not self.downsample:
      return x, x
    return x, PatchEmbed(2 * self.dim, 2, True, self.patchify_impl, self.dtype, name="downsample")(
        x
    )


class MSMLP(nn.Module):
  """MS-MLP classifier / backbone. (N, H, W, in_chans) -> logits (N, num_classes) float32.

  H and W may be any multiples of patch_size * 2^(stages - 1) (32 for the released
  models; `img_size` only sets the shape `init` uses). num_classes=0 builds no head and
  returns the pooled, normalised features (N, embed_dim * 2^(stages - 1)). Requires rng
  'drop_path' when train and drop_rate or drop_path_rate > 0.
  """

  embed_dim: int = 96
  depths: Sequence[int] = (3, 3, 9, 3)
  img_size: int = 224
  patch_size: int = 4
  in_chans: int = 3
  num_classes: int = 1000
  shift_dist: Sequence[int] = RELEASED_SHIFT_DIST
  mix_size: Sequence[Sequence[int]] = RELEASED_MIX_SIZE
  mlp_ratio: float = 4.0
  patch_norm: bool = True
  layer_scale_init_value: float = 1e-6
  drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  dtype: Any = "float32"
  depthwise_impl: str = "auto"
  patchify_impl: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "shift_dist", tuple(int(s) for s in self.shift_dist))
    object.__setattr__(self, "mix_size", tuple(tuple(int(k) for k in row) for row in self.mix_size))
    validate_architecture(self)
    super().__post_init__()

  def config_dict(self) -> dict:
    """JSON-able constructor keywords: `MSMLP(**model.config_dict())` rebuilds it."""
    d = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in ("parent", "name")
    }
    d.update(
        depths=list(self.depths),
        shift_dist=list(self.shift_dist),
        mix_size=[list(row) for row in self.mix_size],
        dtype=jnp.dtype(self.dtype).name,
    )
    return d

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  @property
  def feature_info(self) -> tuple[dict, ...]:
    """Per stage: channels, stride relative to the input, and the module name."""
    return tuple(
        dict(num_chs=self.embed_dim * 2**s, reduction=self.patch_size * 2**s, module=f"layers_{s}")
        for s in range(len(self.depths))
    )

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.patch_embed = PatchEmbed(
        self.embed_dim, self.patch_size, self.patch_norm, self.patchify_impl, dtype
    )
    self.pos_drop = nn.Dropout(self.drop_rate, rng_collection="drop_path")
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    ends = np.cumsum(self.depths).tolist()
    self.layers = [
        Stage(
            self.embed_dim * 2**s,
            self.shift_dist,
            self.mix_size[s],
            tuple(rates[end - depth : end]),
            self.mlp_ratio,
            self.layer_scale_init_value,
            s < len(self.depths) - 1,
            self.depthwise_impl,
            self.patchify_impl,
            dtype,
        )
        for s, (depth, end) in enumerate(zip(self.depths, ends))
    ]
    self.norm = layer_norm(dtype)
    if self.num_classes > 0:
      self.head = linear(self.num_classes, dtype, name=None)

  def stage_features(self, x, train: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3)):
    """The outputs of the stages in `out_indices` (before their downsampling), NHWC:
    stage s gives (N, H / (patch * 2^s), W / (patch * 2^s), embed_dim * 2^s)."""
    stages = len(self.depths)
    if not out_indices or any(not 0 <= int(i) < stages for i in out_indices):
      raise ArchitectureError(
          f"out_indices={tuple(out_indices)} must name stages 0.."
          f"{stages - 1} of this {stages}-stage model"
      )
    _check_input(self, x)
    x = self.pos_drop(self.patch_embed(x.astype(jnp.dtype(self.dtype))), deterministic=not train)
    outputs = {}
    for s in range(max(out_indices) + 1):
      outputs[s], x = self.layers[s](x, train)
    return [outputs[int(i)] for i in out_indices]

  def forward_features(self, x, train: bool = False):
    """The last stage's output (N, H/32, W/32, num_features) for patch 4, 4 stages. The
    final `norm` is not applied: it acts on pooled features (see `forward_head`)."""
    return self.stage_features(x, train, (len(self.depths) - 1,))[0]

  def forward_head(self, features, pre_logits: bool = False):
    """(N, h, w, C) feature map -> mean over (h, w) -> LayerNorm `norm` -> `head`.

    Returns float32 logits (N, num_classes), or the normalised pooled features (N, C) when
    `pre_logits` or num_classes == 0.
    """
    x = self.norm(jnp.mean(features.astype(jnp.dtype(self.dtype)), axis=(1, 2)))
    if pre_logits or self.num_classes == 0:
      return x.astype(jnp.float32)
    return self.head(x).astype(jnp.float32)

  def __call__(self, x, train: bool = False):
    return self.forward_head(self.forward_features(x, train))


def _check_input(model: MSMLP, x):
  """Raises ArchitectureError saying what to change when `x` is no image batch for `model`."""
  shape, c, m = tuple(x.shape), model.in_chans, model.patch_size * 2 ** (len(model.depths) - 1)
  want = f"MSMLP takes images (N, H, W, {c}) (NHWC) with H, W multiples of {m}; got {shape}"
  if len(shape) != 4:
    raise ArchitectureError(f"{want}: give a batch of NHWC images (add a batch axis)")
  if shape[-1] != c and shape[1] == c:
    raise ArchitectureError(f"{want}, which looks like NCHW: use x.transpose(0, 2, 3, 1)")
  if shape[-1] != c:
    raise ArchitectureError(f"{want}: give images with {c} channels last")
  if shape[1] % m or shape[2] % m or not shape[1] or not shape[2]:
    raise ArchitectureError(f"{want}: resize or pad the images to multiples of {m}")


def validate_architecture(model: MSMLP):
  """Raises ArchitectureError with what to change when the sizes cannot form an MS-MLP."""
  depths, groups = model.depths, len(model.shift_dist)
  if not depths or any(d < 0 for d in depths):
    raise ArchitectureError(f"depths must be non-negative block counts, got {depths}")
  if model.num_classes < 0 or model.embed_dim <= 0 or model.patch_size <= 0:
    raise ArchitectureError(
        "num_classes must be >= 0 (0: headless), embed_dim and " "patch_size positive"
    )
  step = model.patch_size * 2 ** (len(depths) - 1)
  if model.img_size <= 0 or model.img_size % step:
    raise ArchitectureError(
        f"img_size must be a positive multiple of {step}, got " f"{model.img_size}"
    )
  if len(model.mix_size) != len(depths) or any(len(r) != groups for r in model.mix_size):
    raise ArchitectureError(
        f"mix_size must give {groups} kernel sizes (one per shift in "
        f"shift_dist) for each of the {len(depths)} stages, got "
        f"{model.mix_size}"
    )
  if any(k <= 0 or k % 2 == 0 for row in model.mix_size for k in row):
    raise ArchitectureError(
        f"mix_size must hold odd positive kernel sizes, got " f"{model.mix_size}"
    )
  for s in range(len(depths)):
    c = model.embed_dim * 2**s
    if len(chunk_sizes(c, groups)) != groups or int(model.mlp_ratio * c) <= 0:
      raise ArchitectureError(
          f"embed_dim={model.embed_dim} gives {c} channels in stage {s + 1}, which "
          f"torch.chunk splits into {len(chunk_sizes(c, groups))} groups, not {groups} "
          "(or a zero-width mlp); use an embed_dim like the released 96 or 128"
      )


def create_msmlp(variant: str = "msmlp_t", **overrides) -> MSMLP:
  """An MSMLP of a named variant ('msmlp_t', 'msmlp_s', 'msmlp_b') with overrides."""
  if variant not in VARIANTS:
    raise ArchitectureError(
        f"unknown MS-MLP variant {variant!r}; choose one of "
        f"{sorted(VARIANTS)} or build MSMLP(embed_dim=..., depths=...)"
    )
  return MSMLP(**{**VARIANTS[variant], **overrides})
