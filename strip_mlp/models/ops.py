"""Array ops of Strip-MLP, each with interchangeable formulations.

Every op takes NHWC activations and kernels in the layout of the matching grouped
convolution in HWIO form (`(kh, kw, in_channels // groups, out_channels)`), so all
formulations of one op share a single parameter and are tested against each other.

Formulations (`impl`):
  depthwise:  'xla'   -> `lax.conv_general_dilated` with `feature_group_count`;
              'shift' -> a sum of kh*kw shifted multiply-adds (XLA:CPU runs this an
                         order of magnitude faster than its depthwise convolution).
  patchify:   'xla'   -> strided convolution;
              'einsum'-> space-to-depth reshape + one dense product.
'auto' picks per backend (see `resolve_impl`).
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

DepthwiseImpl = Literal["auto", "xla", "shift"]
PatchifyImpl = Literal["auto", "xla", "einsum"]

_CHOICES = {"depthwise": ("xla", "shift"), "patchify": ("xla", "einsum")}
# Defaults per backend: CPU figures are in the README's performance section; on GPU/TPU
# XLA's own convolutions are used for depthwise, reshape+matmul for patchify.
_AUTO = {
    "depthwise": {"cpu": "shift"},
    "patchify": {"cpu": "einsum", "gpu": "einsum", "tpu": "einsum"},
}
_FALLBACK = {"depthwise": "xla", "patchify": "einsum"}


def resolve_impl(kind: str, impl: str, platform: str | None = None) -> str:
  """Returns the concrete formulation of op `kind` ('depthwise'|'patchify') for `impl` on
  `platform` ('cpu' | 'gpu' | 'tpu'; default: JAX's default backend)."""
  if impl == "auto":
    return _AUTO[kind].get(platform or jax.default_backend(), _FALLBACK[kind])
  if impl not in _CHOICES[kind]:
    raise ValueError(f"{kind}_impl={impl!r} is not one of {('auto',) + _CHOICES[kind]}")
  return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """Depthwise 'same' convolution, stride 1, no bias (odd kernel sizes).

  x: (N, H, W, C); kernel: (kh, kw, 1, C). Returns (N, H, W, C).
  """
  kh, kw, _, channels = kernel.shape
  if resolve_impl("depthwise", impl) == "xla":
    ph, pw = kh // 2, kw // 2
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )
  return _depthwise_shift(x, kernel)


def _shifted_sum(x, kernel):
  """sum_{a,b} pad(x)[:, a:a+H, b:b+W] * kernel[a, b, 0]: one fused loop on XLA."""
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = None
  for a in range(kh):
    for b in range(kw):
      term = xp[:, a : a + h, b : b + w, :] * kernel[a, b, 0]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _depthwise_shift(x, kernel):
  return _shifted_sum(x, kernel)


def _depthwise_shift_fwd(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_shift_bwd(residuals, g):
  """dx: the same op with the kernel flipped. dkernel: per-tap sums of x * g, one image
  at a time so that the kh*kw passes over the image stay in cache."""
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  dx = _shifted_sum(g, kernel[::-1, ::-1])
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

  def add_image(acc, image_and_grad):
    xi, gi = image_and_grad
    taps = [
        jnp.sum((xi[a : a + h, b : b + w] * gi).astype(jnp.float32), axis=(0, 1))
        for a in range(kh)
        for b in range(kw)
    ]
    return acc + jnp.stack(taps).reshape(acc.shape), None

  dk, _ = lax.scan(add_image, jnp.zeros((kh, kw, 1, x.shape[-1]), jnp.float32), (xp, g))
  return dx, dk.astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def patchify_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """Convolution with kernel size == stride == p, no padding, no bias (dense or grouped).

  x: (N, H, W, I); kernel: (p, p, I // groups, O) with groups = I / kernel.shape[2].
  For groups > 1 every group has O // groups outputs, output channel o reading input
  channel o // (O // groups) (PyTorch's grouped-conv order). Returns (N, H/p, W/p, O).
  """
  p, _, in_per_group, out_channels = kernel.shape
  n, h, w, in_channels = x.shape
  groups = in_channels // in_per_group
  if resolve_impl("patchify", impl) == "xla":
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(p, p),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
  patches = x.reshape(n, h // p, p, w // p, p, in_channels)
  if groups == 1:
    return jnp.einsum("nhawbi,abio->nhwo", patches, kernel)
  if in_per_group != 1:
    raise NotImplementedError("einsum patchify supports dense or depthwise-style groups")
  mult = out_channels // groups
  out = jnp.einsum("nhawbc,abcm->nhwcm", patches, kernel.reshape(p, p, groups, mult))
  return out.reshape(n, h // p, w // p, out_channels)


def strip_mix(x: jax.Array, kernel: jax.Array, bias: jax.Array, along: str) -> jax.Array:
  """Channel-grouped strip mixing with 3 taps across neighbouring strips.

  x: (N, H, W, P, G): channel d = c1 * G + g split as (c1, g).
  kernel: (3, L, L, G) indexed [tap, input position, output position, group];
  bias: (L, G). `along='rows'`: every row mixes its W tokens, taps over rows i-1, i, i+1
  (zero padded). `along='cols'`: every column mixes its H tokens, taps over columns.
    rows: y[n, i, v, c, g] = b[v, g] + sum_k sum_w K[k, w, v, g] * x[n, i + k - 1, w, c, g]
  Returns an array shaped like x.
  """
  if along == "rows":
    shift_axis, spec, bias = 1, "nhkwcg,kwvg->nhvcg", bias[:, None, :]
  elif along == "cols":
    shift_axis, spec, bias = 2, "nhwkcg,khvg->nvwcg", bias[:, None, None, :]
  else:
    raise ValueError(f"along must be 'rows' or 'cols', got {along!r}")
  size = x.shape[shift_axis]
  pad = [(0, 0)] * x.ndim
  pad[shift_axis] = (1, 1)
  xp = jnp.pad(x, pad)
  taps = jnp.stack(
      [lax.slice_in_dim(xp, k, k + size, axis=shift_axis) for k in range(3)], axis=shift_axis + 1
  )
  return jnp.einsum(spec, taps, kernel) + bias
