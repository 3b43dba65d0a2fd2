"""Strip-MLP weights of one training resolution resampled for another (fine-tuning at 384).

Only the strip layers' tensors depend on the strip length L = img_size / 4 / 2^s of a
stage: `proj_h`/`proj_w` kernels (3, L, L, G) and biases (L, G), and the relative
position tables `relate_pos_h`/`relate_pos_w` (2L + 1, D). Everything else is copied.

With U (L', L) the linear interpolation from L to L' token positions (half-pixel centres,
triangle widened by L / L' when shrinking, rows summing to 1), a strip layer y = K^T x + b
on L tokens becomes y' = U (K^T (D x') + b) on L' tokens, where D (L, L') averages the new
tokens back onto the old ones (D = U^T with rows scaled to sum to 1):
  K'[t] = D^T K[t] U^T  (a bilinear resize of each (L, L) token-mixing matrix, input axis
                          scaled by 1 / column sums of U, about L / L'),  b' = U b.
So a constant input gets exactly the interpolated response of the trained layer, a smooth
one approximately, and L' == L is the identity (U = D = I). Linear rather than bicubic:
the weights are non-negative, so the resampled matrices stay within the range of the
trained ones instead of ringing on their non-smooth (input, output) structure.
A position table is interpolated along its offset axis, offset o' reading o' * L / L'
(the offsets of the half-pixel position map), values unscaled (they are added).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from strip_mlp.errors import UserError
from strip_mlp.models.strip_mlp import StripMLP, abstract_variables


class ResampleError(UserError, ValueError):
  """Weights that cannot be resampled to the requested model."""


def interpolation_matrix(positions: np.ndarray, n_src: int, scale: float) -> np.ndarray:
  """(len(positions), n_src) float64 linear weights reading fractional source positions.

  scale: source steps per target step; above 1 the triangle is widened by it
  (antialiasing). Rows sum to 1 (weights cut off at the ends are renormalised).
  """
  dist = np.abs(np.asarray(positions, np.float64)[:, None] - np.arange(n_src)[None, :])
  weights = np.maximum(0.0, 1.0 - dist / max(1.0, scale))
  return weights / weights.sum(axis=1, keepdims=True)


def resize_matrix(src: int, dst: int) -> np.ndarray:
  """U (dst, src): token positions of a length-src axis interpolated at dst tokens."""
  scale = src / dst
  return interpolation_matrix((np.arange(dst) + 0.5) * scale - 0.5, src, scale)


def resample_strip_kernel(kernel: np.ndarray, length: int) -> np.ndarray:
  """(3, L, L, G) [tap, input, output, group] -> (3, length, length, G), see module doc."""
  u = resize_matrix(kernel.shape[1], length)
  d_t = u / u.sum(axis=0, keepdims=True)
  return np.einsum("ai,tiog,bo->tabg", d_t, np.asarray(kernel, np.float64), u)


def resample_strip_bias(bias: np.ndarray, length: int) -> np.ndarray:
  """(L, G) -> (length, G): the bias interpolated along the output tokens."""
  return resize_matrix(bias.shape[0], length) @ np.asarray(bias, np.float64)


def resample_position_table(table: np.ndarray, length: int) -> np.ndarray:
  """(2L + 1, D) relative-position table -> (2 * length + 1, D)."""
  src = (table.shape[0] - 1) // 2
  scale = src / length
  positions = (np.arange(2 * length + 1) - length) * scale + src
  return interpolation_matrix(positions, 2 * src + 1, scale) @ np.asarray(table, np.float64)


def _resample_leaf(path: tuple, value: np.ndarray, shape: tuple) -> np.ndarray:
  parent, leaf = path[-2], path[-1]
  if parent in ("proj_h", "proj_w") and leaf == "kernel":
    return resample_strip_kernel(value, shape[1])
  if parent in ("proj_h", "proj_w") and leaf == "bias":
    return resample_strip_bias(value, shape[0])
  if parent in ("relate_pos_h", "relate_pos_w") and leaf == "embeddings_table":
    return resample_position_table(value, (shape[0] - 1) // 2)
  raise ResampleError(
      f"{'/'.join(path)} has shape {value.shape}, the target model "
      f"{shape}, and is not a strip-length tensor"
  )


def resample_variables(variables, src_model: StripMLP, dst_model: StripMLP) -> dict:
  """Variables of `src_model` -> variables for `dst_model` (another img_size).

  Both models must have the same embed_dim and layers; dst may have the same classes or
  none (num_classes=0 drops the head). Leaves keep their dtypes; returns plain dicts.
  """
  same = ("embed_dim", "layers")
  if any(getattr(src_model, k) != getattr(dst_model, k) for k in same) or (
      dst_model.num_classes not in (0, src_model.num_classes)
  ):
    raise ResampleError(
        "resampling changes only img_size (and may drop the head): the weights are "
        f"embed_dim={src_model.embed_dim}, layers={src_model.layers}, "
        f"num_classes={src_model.num_classes}; build the target model with those"
    )
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  out = {}
  for path, want in traverse_util.flatten_dict(abstract_variables(dst_model)).items():
    if path not in flat:
      raise ResampleError(f"the weights have no {'/'.join(path)}; are they {src_model}'s?")
    value = np.asarray(flat[path])
    if value.shape != want.shape:
      value = _resample_leaf(path, value, want.shape)
    out[path] = jnp.asarray(value, want.dtype)
  return traverse_util.unflatten_dict(out)
