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
'auto' picks per backend (see `resolve_impl`). `strip_mix` takes an `order` ('shift_first'
for training, 'mix_first' for inference: the faster of each on XLA:CPU), and `add_to_each`
sums its gradient over the batch the way each backend runs fastest; so does `linear`'s
weight gradient.
"""

import math
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


def _pad_same(x, kh, kw):
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


def _shifted_sum(xp, kernel, h, w):
  """sum_{a,b} xp[:, a:a+h, b:b+w] * kernel[a, b, 0] for a padded xp: one fused loop on XLA."""
  kh, kw = kernel.shape[:2]
  out = None
  for a in range(kh):
    for b in range(kw):
      term = xp[:, a : a + h, b : b + w, :] * kernel[a, b, 0]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _depthwise_shift(x, kernel):
  kh, kw = kernel.shape[:2]
  return _shifted_sum(_pad_same(x, kh, kw), kernel, *x.shape[1:3])


def _depthwise_shift_fwd(x, kernel):
  return _depthwise_shift(x, kernel), (x, kernel)


def _depthwise_shift_bwd(residuals, g):
  """dx: the same op on g with the kernel flipped; dkernel: per-tap sums of x * g.

  Both run in one loop over the images. Its inputs are materialised once, where XLA:CPU
  would otherwise fuse the producers of g into each of the kh*kw taps of dx; and each
  image's tap sums are a few variadic reductions over the whole image, of ~8 taps each
  (the fastest grouping on XLA:CPU: 2-3x fewer passes than one reduction per tap, and
  faster than one reduction of all kh*kw taps at once).
  """
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  flipped = kernel[::-1, ::-1]
  taps = [(a, b) for a in range(kh) for b in range(kw)]
  per_group = math.ceil(len(taps) / math.ceil(len(taps) / 8))  # 9 -> 9, 21 -> 7, 49 -> 7

  def image(acc, xg):
    xi, gi = xg  # one padded image each, (h + kh - 1, w + kw - 1, C)
    dxi = _shifted_sum(gi[None], flipped, h, w)[0]
    g0 = gi[kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]
    sums = []
    for i in range(0, len(taps), per_group):
      prods = [
          (xi[a : a + h, b : b + w] * g0).astype(jnp.float32) for a, b in taps[i : i + per_group]
      ]
      sums += lax.reduce(prods, [jnp.float32(0)] * len(prods), _add_each, (0, 1))  # each (C,)
    return acc + jnp.stack(sums).reshape(acc.shape), dxi

  dk, dx = lax.scan(
      image,
      jnp.zeros(kernel.shape, jnp.float32),
      (_pad_same(x, kh, kw), _pad_same(g, kh, kw)),
  )
  return dx, dk.astype(kernel.dtype)


def _add_each(us, vs):
  return [u + v for u, v in zip(us, vs)]


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


def strip_mix(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, along: str, order: str = "shift_first"
) -> jax.Array:
  """Channel-grouped strip mixing with 3 taps across neighbouring strips.

  x: (N, H, W, P, G): channel d = c1 * G + g split as (c1, g).
  kernel: (3, L, L, G) indexed [tap, input position, output position, group];
  bias: (L, G). `along='rows'`: every row mixes its W tokens, taps over rows i-1, i, i+1
  (zero padded). `along='cols'`: every column mixes its H tokens, taps over columns.
    rows: y[n, i, v, c, g] = b[v, g] + sum_k sum_w K[k, w, v, g] * x[n, i + k - 1, w, c, g]
  Returns an array shaped like x.

  order: the same sum in two orders. 'shift_first': the 3 shifted copies of x side by side,
  then one product (its gradient is the faster one on XLA:CPU, so training uses it);
  'mix_first': one product with the 3 taps' kernels, then 3 shifted adds of its outputs
  (the faster forward pass on XLA:CPU: half the time at L = 28 and 56).
  """
  if along not in ("rows", "cols"):
    raise ValueError(f"along must be 'rows' or 'cols', got {along!r}")
  axis = 1 if along == "rows" else 2  # the axis the taps cross
  size = x.shape[axis]
  pad = lambda t, lo, hi: jnp.pad(t, [(lo, hi) if a == axis else (0, 0) for a in range(t.ndim)])
  bias = bias[:, None] if along == "rows" else bias[:, None, None]
  if order == "shift_first":
    xp = pad(x, 1, 1)
    taps = jnp.stack([lax.slice_in_dim(xp, k, k + size, axis=axis) for k in range(3)], axis + 1)
    spec = "nhkwcg,kwvg->nhvcg" if along == "rows" else "nhwkcg,khvg->nvwcg"
    return jnp.einsum(spec, taps, kernel) + bias
  if order == "mix_first":
    # x is the product's left operand, so its output (G, N, H|W, C, 3, L) keeps each
    # image's strips together: moving it to (3, N, H, W, C, G) is a local transpose
    # (on XLA:CPU ~1.1x faster inference than the other orientation, which moves the
    # whole batch).
    contract = 2 if along == "rows" else 1
    mixed = lax.dot_general(x, kernel, (((contract,), (1,)), ((4,), (3,))))
    mixed = jnp.transpose(mixed, (4, 1, 2, 5, 3, 0) if along == "rows" else (4, 1, 5, 2, 3, 0))

    # Tap k's rows (cols) moved by one, zero filled, each its own pad: XLA then fuses them
    # into the sum instead of copying all of `mixed` padded first.
    shifted = lambda k, lo, hi: pad(lax.slice_in_dim(mixed[k], hi, size - lo, axis=axis), lo, hi)

    return mixed[1] + shifted(0, 1, 0) + shifted(2, 0, 1) + bias
  raise ValueError(f"order must be 'shift_first' or 'mix_first', got {order!r}")


@jax.custom_vjp
def add_to_each(x: jax.Array, table: jax.Array) -> jax.Array:
  """x + table for x (B, *S) and table (*S): one table added to every item of a batch.

  The same sum as broadcasting; its gradient for `table` sums the B cotangents as a
  product with a vector of ones, which XLA:CPU runs ~50x faster than its reduction over a
  leading axis into a large output (on other backends: that reduction).
  """
  return x + table


def _add_to_each_fwd(x, table):
  return x + table, (jnp.zeros((), x.dtype), jnp.zeros((), table.dtype))


def _add_to_each_bwd(dtypes, g):
  dtable = lax.platform_dependent(g, cpu=_sum_leading_by_product, default=_sum_leading)
  return g.astype(dtypes[0].dtype), dtable.astype(dtypes[1].dtype)


def _sum_leading(g):
  return jnp.sum(g, axis=0)


def _sum_leading_by_product(g):
  ones = jnp.ones((g.shape[0],), g.dtype)
  flat = lax.dot(
      ones,
      g.reshape(g.shape[0], -1),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
  )
  return flat.reshape(g.shape[1:]).astype(g.dtype)


add_to_each.defvjp(_add_to_each_fwd, _add_to_each_bwd)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel over the last axis: x (..., I), kernel (I, O) -> (..., O), as `nn.Dense`.

  The same product as `nn.Dense` and the same gradients as autodiff's (up to the order of
  summation). On XLA:CPU the kernel's gradient is written as (x as a (P, I) matrix,
  transposed) @ g: XLA:CPU runs autodiff's contraction over the leading axes 1.3-4x slower,
  through a strided copy of one operand (other backends keep that contraction).
  """
  return _linear(x, kernel)


def _linear(x, kernel):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, kernel):
  return _linear(x, kernel), (x, kernel)


def _linear_bwd(residuals, g):
  x, kernel = residuals
  dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  dkernel = lax.platform_dependent(x, g, cpu=_weight_grad_by_matrix, default=_weight_grad)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _weight_grad(x, g):
  leading = tuple(range(x.ndim - 1))
  return lax.dot_general(x, g, ((leading, leading), ((), ())))


def _weight_grad_by_matrix(x, g):
  rows = x.reshape(-1, x.shape[-1]).T  # (I, P)
  return lax.dot_general(rows, g.reshape(-1, g.shape[-1]), (((1,), (0,)), ((), ())))


linear.defvjp(_linear_fwd, _linear_bwd)


def channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and variance over the last axis, (..., C) float -> two (..., 1) arrays.

  The two-pass statistics of `nn.LayerNorm(use_fast_variance=False)`: mean(x), then
  mean((x - mean)^2). On XLA:CPU the sums are products with a column of ones: XLA:CPU
  otherwise hands the reductions, with the product they feed, to one library fusion that
  runs the channel-mixing layer ~1.5x slower (other backends keep the reductions).
  """
  return lax.platform_dependent(x, cpu=_moments_by_product, default=_moments)


def _moments(x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return mean, jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)


@jax.custom_vjp
def _moments_by_product(x):
  c = x.shape[-1]
  ones = jnp.ones((c, 1), x.dtype)
  total = lambda u: lax.dot_general(
      u, ones, (((u.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
  )
  mean = total(x) / c
  return mean, total(jnp.square(x - mean)) / c


def _moments_by_product_fwd(x):
  mean, var = _moments_by_product(x)
  return (mean, var), (x, mean)


def _moments_by_product_bwd(residuals, g):
  """d mean / dx = 1/C, d var / dx = 2 (x - mean) / C: elementwise, no product."""
  x, mean = residuals
  g_mean, g_var = g
  c = x.shape[-1]
  return ((g_mean + 2.0 * g_var * (x - mean)) / c,)


_moments_by_product.defvjp(_moments_by_product_fwd, _moments_by_product_bwd)
