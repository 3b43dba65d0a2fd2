"""Strip layers on feature maps of any size: overlapping windows of the trained strip length.

A strip layer's weights are tied to the strip length L it was trained at. On an H x W map
(H, W any positive sizes) each spatial axis is covered by windows of length L, placed as in
MLP-DINO (the Strip-MLP authors' detection backbone):

  * an axis shorter than L is zero padded at its end to L (one window);
  * otherwise count = round(P / L + 0.5) windows (Python's round, half to even, so an odd
    multiple of L gets one window more than it needs), overlap
    o = round((count * L - P) / (count - 1) - 0.5), window i starts at i * (L - o), and a
    window that would run past the end is moved back to end at the end of the axis;
  * the window outputs are merged from first to last: where window k overlaps what is
    merged so far, the result is 0.5 * merged + 0.5 * window k.

The layer runs once on all windows gathered into the batch axis (window-major, then the
images), and the merge is a gather of at most a few windows per output position with
fixed weights, so the compiled program's size does not grow with the number of windows.
At H == W == L the layer is applied to the map itself, untouched.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """Where the windows of one axis lie and how their outputs are merged.

  size: the axis' extent; padded: max(size, length); starts: window starts in [0, padded].
  merge_index, merge_weight: (size, K) arrays: output position p is
  sum_k merge_weight[p, k] * windows[merge_index[p, k] // length][merge_index[p, k] % length]
  (K = the most windows covering one position; unused slots have weight 0).
  """

  size: int
  length: int
  padded: int
  starts: tuple[int, ...]
  merge_index: np.ndarray
  merge_weight: np.ndarray

  @property
  def identity(self) -> bool:
    return self.size == self.length

  @property
  def gather_index(self) -> np.ndarray:
    """(count * length,) positions of the padded axis read by the windows, in order."""
    return (np.asarray(self.starts)[:, None] + np.arange(self.length)[None, :]).reshape(-1)


def _window_starts(padded: int, length: int) -> tuple[list[int], list[int]]:
  """MLP-DINO's window starts and the overlap with which it merges each window."""
  if padded == length:
    return [0], [0]
  count = round(padded / length + 0.5)
  overlap = round((count * length - padded) / (count - 1) - 0.5)
  starts, last_overlap = [0], 0
  for i in range(1, count):
    start = i * (length - overlap)
    if start + length > padded:
      start = padded - length
      last_overlap = starts[-1] + length - start
    starts.append(start)
  return starts, [0] + [overlap] * (count - 2) + [last_overlap or overlap]


@functools.lru_cache(maxsize=None)
def axis_plan(size: int, length: int) -> AxisPlan:
  """The windows of an axis of `size` positions for a strip layer of `length`."""
  if size <= 0 or length <= 0:
    raise ValueError(f"axis size {size} and strip length {length} must be positive")
  padded = max(size, length)
  starts, overlaps = _window_starts(padded, length)
  # Replay the sequential merge: weights[p] maps window -> weight at padded position p.
  weights = [dict() for _ in range(padded)]
  merged_end = 0
  for k, (start, overlap) in enumerate(zip(starts, overlaps)):
    if start != merged_end - overlap or start + length > padded:
      raise AssertionError(f"window {k} of axis {size}/{length} breaks the merge order")
    for p in range(start, start + length):
      if p < merged_end:
        weights[p] = {j: 0.5 * w for j, w in weights[p].items()}
        weights[p][k] = 0.5
      else:
        weights[p] = {k: 1.0}
    merged_end = start + length
  if merged_end != padded:
    raise AssertionError(f"windows of axis {size}/{length} end at {merged_end}")
  most = max(len(w) for w in weights[:size])
  index = np.zeros((size, most), np.int32)
  weight = np.zeros((size, most), np.float32)
  for p in range(size):
    for slot, (k, w) in enumerate(sorted(weights[p].items())):
      index[p, slot] = k * length + p - starts[k]
      weight[p, slot] = w
  return AxisPlan(size, length, padded, tuple(starts), index, weight)


def _merge_axis(y: jax.Array, plan: AxisPlan, axis: int) -> jax.Array:
  """y has the windows of `plan` concatenated along `axis` -> the merged axis (plan.size)."""
  taken = jnp.take(y, jnp.asarray(plan.merge_index.reshape(-1)), axis=axis)
  shape = list(y.shape)
  shape[axis : axis + 1] = plan.merge_index.shape
  taken = taken.reshape(shape)
  weight_shape = [1] * taken.ndim
  weight_shape[axis : axis + 2] = plan.merge_weight.shape
  weight = jnp.asarray(plan.merge_weight, y.dtype).reshape(weight_shape)
  if plan.merge_index.shape[1] == 1 and np.all(plan.merge_weight == 1):
    return jnp.squeeze(taken, axis + 1)
  return jnp.sum(taken * weight, axis=axis + 1)


def windowed(fn: Callable[[jax.Array], jax.Array], x: jax.Array, length: int) -> jax.Array:
  """Applies `fn` (on (B, length, length, C) maps) to an (N, H, W, C) map through windows.

  fn must map (B, length, length, C) -> (B, length, length, C'); returns (N, H, W, C').
  fn sees B = N * (windows along H) * (windows along W) maps, window-major; zero padding
  where an axis is shorter than `length`. At H == W == length, fn(x) itself.
  """
  n, h, w, c = x.shape
  ph, pw = axis_plan(h, length), axis_plan(w, length)
  if ph.identity and pw.identity:
    return fn(x)
  x = jnp.pad(x, ((0, 0), (0, ph.padded - h), (0, pw.padded - w), (0, 0)))
  x = jnp.take(x, jnp.asarray(ph.gather_index), axis=1)
  x = jnp.take(x, jnp.asarray(pw.gather_index), axis=2)
  nh, nw = len(ph.starts), len(pw.starts)
  x = x.reshape(n, nh, length, nw, length, c).transpose(1, 3, 0, 2, 4, 5)
  y = fn(x.reshape(nh * nw * n, length, length, c))
  out = y.shape[-1]
  y = y.reshape(nh, nw, n, length, length, out).transpose(2, 0, 3, 1, 4, 5)
  y = y.reshape(n, nh * length, nw * length, out)
  return _merge_axis(_merge_axis(y, pw, axis=2), ph, axis=1)
