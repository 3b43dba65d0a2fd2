"""Strip-MLP (Cao et al., ICCV 2023) as a Flax classifier and backbone, NHWC.

    model = create_model("tiny_light", img_size=224)      # trained strip lengths 56/28/14/7
    variables = model.init(key, jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images)                # (N, H, W, 3), H, W multiples of 32
    maps = model.apply(variables, images, method="stage_features", out_indices=(1, 2, 3))

`img_size` fixes the strip lengths the weights are trained at (img_size / 4 / 2^s in
stage s); the model takes images of any height and width that are multiples of 32 (the
strip layers then run on overlapping windows, see `strip_mlp.models.windows`). At exactly
img_size x img_size the function is the one the released PyTorch weights compute.
The layers live in `strip_mlp.models.strip_mlp_layers`; parameter names mirror the PyTorch
`state_dict`.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from strip_mlp.errors import UserError
from strip_mlp.models.batch_norm import BatchNorm
from strip_mlp.models.strip_mlp_layers import (
    BN_EPS,
    BN_MOMENTUM,
    Block,
    PatchConv,
    dense,
    strip_patch,
)

VARIANTS = {
    "tiny_light": dict(embed_dim=80, layers=(2, 2, 6, 2)),  # Strip-MLP-T*
    "tiny": dict(embed_dim=80, layers=(2, 2, 12, 2)),  # Strip-MLP-T
    "small": dict(embed_dim=96, layers=(2, 2, 18, 2)),  # Strip-MLP-S
    "base": dict(embed_dim=112, layers=(2, 2, 18, 2)),  # Strip-MLP-B
}
# The constructor keywords that fix the shapes of the parameters.
ARCHITECTURE_KEYS = ("embed_dim", "layers", "img_size", "num_classes")

# With remat=True each block keeps only its input for the backward pass and recomputes
# everything inside it (its 3x-wide channel-mixing hidden map and the strip windows are
# most of the activation memory), for about one more forward pass per step.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


class ModelInputError(UserError, ValueError):
  """Images (or feature indices) the model cannot take."""


class StripMLP(nn.Module):
  """Strip-MLP. (N, H, W, 3) float -> logits (N, num_classes) float32.

  H and W: any multiples of 32 (img_size fixes the trained strip lengths, not the input).
  num_classes=0: no head; `__call__` returns the pooled features (N, 8 * embed_dim) in the
  compute dtype. Stage outputs and pooled features are sown into the 'intermediates'
  collection (`stage1`..`stage4`, `pooled`). Requires rng 'drop_path' when train and
  drop_path_rate > 0. remat=True recomputes each block in the backward pass (same
  values and gradients, less memory; see REMAT_POLICY). Initialise with `model.init(key,
  images)` (the full forward), then call any entry point with `method=`.
  """

  embed_dim: int = 80
  layers: Sequence[int] = (2, 2, 6, 2)
  img_size: int = 224
  num_classes: int = 1000
  drop_path_rate: float = 0.1
  dtype: Any = "float32"
  depthwise_impl: str = "auto"
  patchify_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
    validate_architecture(self.embed_dim, self.layers, self.img_size, self.num_classes)
    super().__post_init__()

  def config_dict(self) -> dict:
    """JSON-able constructor keywords: `StripMLP(**model.config_dict())` rebuilds it."""
    d = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in ("parent", "name")
    }
    d["layers"] = list(d["layers"])
    d["dtype"] = jnp.dtype(d["dtype"]).name
    return d

  @property
  def feature_info(self) -> tuple[dict, ...]:
    """Per stage: channels, reduction (input px per feature px) and the sown name."""
    return tuple(
        dict(num_chs=self.embed_dim * 2**s, reduction=4 * 2**s, module=f"stage{s + 1}")
        for s in range(4)
    )

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    e = self.embed_dim
    patch = lambda feat, p, groups=1: PatchConv(feat, p, groups, self.patchify_impl, dtype)
    self.patch_embed = patch(e, 4)
    self.merging1 = patch(2 * e, 2)
    self.conv_s1_28 = patch(4 * e, 2, groups=2 * e)
    self.conv_s1_14 = patch(8 * e, 2, groups=4 * e)
    self.merging2 = patch(4 * e, 2)
    self.conv_s2_14 = patch(8 * e, 2, groups=4 * e)
    self.merging3 = patch(8 * e, 2)
    block = nn.remat(Block, static_argnums=(2,), policy=REMAT_POLICY) if self.remat else Block
    for s, count in enumerate(self.layers):  # attribute blocks{s} -> modules blocks{s}_{i}
      length = self.img_size // 4 // 2**s
      setattr(
          self,
          f"blocks{s + 1}",
          [block(length, self.drop_path_rate, self.depthwise_impl, dtype) for _ in range(count)],
      )
    self.norm = BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype)
    if self.num_classes:
      self.head = dense(self.num_classes, 8 * e, dtype=dtype)

  def _stage(self, s: int, x, train: bool):
    for block in getattr(self, f"blocks{s}"):
      x = block(x, train)
    self.sow("intermediates", f"stage{s}", x)
    return x

  def _stages(self, x, train: bool, last: int) -> list:
    """Outputs of stages 1 .. last + 1, (N, H / 4 / 2^s, W / 4 / 2^s, embed_dim * 2^s)."""
    _check_input(tuple(x.shape))
    x = self._stage(1, self.patch_embed(x.astype(jnp.dtype(self.dtype))), train)
    outs = [x]
    if last >= 1:
      x = self.merging1(x)
      a = self.conv_s1_28(x)
      x = self._stage(2, x, train)
      outs.append(x)
    if last >= 2:
      x = self.merging2(x)
      c = self.conv_s2_14(x)
      x = self._stage(3, x + a, train)
      outs.append(x)
    if last >= 3:
      x = self.merging3(x)
      x = self._stage(4, x + self.conv_s1_14(a) + c, train)
      outs.append(x)
    return outs

  def __call__(self, x, train: bool = False):
    """(N, H, W, 3) -> logits (N, num_classes) float32 (pooled features if headless)."""
    return self.forward_head(self.forward_features(x, train))

  def forward_features(self, x, train: bool = False):
    """(N, H, W, 3) -> the final feature map (N, H/32, W/32, 8 * embed_dim): after the
    final norm, before pooling; compute dtype."""
    return self.norm(self._stages(x, train, 3)[-1], use_running_average=not train)

  def forward_head(self, features, pre_logits: bool = False):
    """(N, h, w, C) final features -> logits (N, num_classes) float32, or the pooled
    features (N, C) when pre_logits or the model has no head."""
    pooled = jnp.mean(features, axis=(1, 2))
    self.sow("intermediates", "pooled", pooled)
    if pre_logits or not self.num_classes:
      return pooled
    return self.head(pooled).astype(jnp.float32)

  def stage_features(self, x, train: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3)):
    """(N, H, W, 3) -> [stage outputs (N, H / r, W / r, num_chs) for i in out_indices],
    r and num_chs as in `feature_info[i]` (stage outputs before the final norm)."""
    out_indices = tuple(out_indices)
    if not out_indices or any(i not in range(4) for i in out_indices):
      raise ModelInputError(f"out_indices must be stage numbers in 0..3, got {out_indices}")
    outs = self._stages(x, train, max(out_indices))
    return [outs[i] for i in out_indices]


def _check_input(shape: tuple):
  """Raises ModelInputError saying what to change when images of `shape` do not fit."""
  want = f"StripMLP takes NHWC RGB images (N, H, W, 3), H and W multiples of 32, but got {shape}"
  if len(shape) != 4:
    raise ModelInputError(f"{want}; give a batch of NHWC images (add a batch axis for one)")
  if shape[1] in (1, 3) and shape[3] not in (1, 3):
    raise ModelInputError(
        f"{want}, which looks like NCHW: transpose it with " "x.transpose(0, 2, 3, 1)"
    )
  if shape[3] != 3:
    raise ModelInputError(f"{want}; give RGB images with 3 channels last")
  h, w = shape[1:3]
  if h <= 0 or w <= 0 or h % 32 or w % 32:
    raise ModelInputError(
        f"image size {h}x{w} is not a multiple of 32 in both height and width; pad or "
        f"resize the images (e.g. to {max(32, -(-h // 32) * 32)}x{max(32, -(-w // 32) * 32)})"
    )


def abstract_variables(model):
  """Shapes/dtypes of `model`'s variables without allocating them (any family: a model
  without `img_size` has parameters of the same shapes at every size)."""
  size = getattr(model, "img_size", 64)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def validate_architecture(embed_dim, layers, img_size, num_classes):
  """Raises ValueError with what to change when the sizes cannot form a Strip-MLP."""
  if len(layers) != 4 or any(n < 0 for n in layers):
    raise ValueError(f"layers must be 4 non-negative block counts, got {layers}")
  if img_size <= 0 or img_size % 32:
    raise ValueError(f"img_size must be a positive multiple of 32, got {img_size}")
  if num_classes < 0:
    raise ValueError(f"num_classes must be positive (or 0 for no head), got {num_classes}")
  for s in range(4):
    c = embed_dim * 2**s
    if c <= 0 or (c // 2) % strip_patch(c) or c % 4:
      raise ValueError(
          f"embed_dim={embed_dim} gives {c} channels in stage {s + 1}, which the strip "
          "layer cannot split into groups; use a multiple of 8 (e.g. 16, 40, 80, 96, 112)"
      )


def create_model(variant: str = "tiny_light", **overrides) -> StripMLP:
  """A StripMLP of a named variant ('tiny_light', 'tiny', 'small', 'base') with overrides."""
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)} or "
        "build StripMLP(embed_dim=..., layers=...) directly"
    )
  return StripMLP(**{**VARIANTS[variant], **overrides})


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
