"""Strict PyTorch state dict <-> Flax variables mapping, shared by every family's converter.

A family converter names, for every Flax leaf path, its state-dict key and a `Layout`: how
the Flax array is laid out relative to the PyTorch tensor. Every Flax leaf takes exactly one
tensor and every tensor must be taken: missing, unexpected and mis-shaped keys are reported
together in one `CheckpointFormatError` line.
"""

import collections
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from strip_mlp.errors import CheckpointFormatError
from strip_mlp.checkpoints.tree_diff import key_report


def to_torch(layout: str, a: np.ndarray) -> np.ndarray:
  """A Flax array in the layout of its PyTorch tensor (layouts: see the module doc)."""
  if layout == "conv":
    return a.transpose(3, 2, 0, 1)
  if layout == "conv1x1":
    return a.T[:, :, None, None]
  if layout == "linear":
    return a.T
  if layout == "strip_kernel":
    _, length, _, groups = a.shape
    return a.transpose(3, 2, 1, 0).reshape(groups * length, length, 1, 3)
  if layout == "strip_bias":
    return a.T.reshape(-1)
  return a


def to_flax(layout: str, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A PyTorch tensor in the layout of the Flax array of `shape`."""
  if layout == "conv":
    return t.transpose(2, 3, 1, 0)
  if layout == "conv1x1":
    return t[:, :, 0, 0].T
  if layout == "linear":
    return t.T
  if layout == "strip_kernel":
    _, length, _, groups = shape
    return t.reshape(groups, length, length, 3).transpose(3, 2, 1, 0)
  if layout == "strip_bias":
    length, groups = shape
    return t.reshape(groups, length).T
  return t


class Layout(NamedTuple):
  """to_flax(torch_array, flax_shape) -> flax array; to_torch(flax_array) -> torch array."""

  to_flax: Callable[[np.ndarray, tuple], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _standard(name: str) -> Layout:
  return Layout(functools.partial(to_flax, name), functools.partial(to_torch, name))


SAME = _standard("same")
LINEAR = _standard("linear")  # (in, out) <-> (out, in)
CONV = _standard("conv")  # HWIO <-> OIHW
CONV1X1 = _standard("conv1x1")  # (in, out) <-> (out, in, 1, 1)
STRIP_KERNEL = _standard("strip_kernel")  # (3, L, L, G) <-> grouped (G*L, L, 1, 3)
STRIP_BIAS = _standard("strip_bias")  # (L, G) <-> (G*L,)
LAYOUTS = {
    "same": SAME,
    "linear": LINEAR,
    "conv": CONV,
    "conv1x1": CONV1X1,
    "strip_kernel": STRIP_KERNEL,
    "strip_bias": STRIP_BIAS,
}

KeyFn = Callable[[tuple], str]
LayoutFn = Callable[[tuple, int], Layout]


def abstract_variables(model, img_size: int):
  """Shapes/dtypes of `model`'s variables (no allocation, no compile)."""
  x = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def state_dict_to_variables(
    sd: dict, abstract, key_fn: KeyFn, layout_fn: LayoutFn, description: str
) -> dict:
  """Fills every leaf of `abstract` (a variables tree of shapes) from `sd` ({key: array}).

  Raises CheckpointFormatError naming missing, unexpected and mis-shaped keys; the message
  starts with 'state dict does not match <description>'.
  """
  flat = traverse_util.flatten_dict(abstract)
  sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  out, missing, mismatched, used = {}, [], [], set()
  for path, leaf in flat.items():
    key, layout = key_fn(path), layout_fn(path, len(leaf.shape))
    if key in used:
      raise RuntimeError(f"two Flax variables map to the state-dict key {key!r}")
    if key not in sd:
      missing.append(key)
      continue
    used.add(key)
    want = layout.to_torch(np.broadcast_to(np.float32(0), leaf.shape)).shape
    if tuple(sd[key].shape) != want:
      mismatched.append(f"{key} {tuple(sd[key].shape)} != {want}")
      continue
    out[path] = jnp.asarray(layout.to_flax(np.asarray(sd[key], np.float32), leaf.shape))
  unexpected = set(sd) - used
  problems = key_report(missing, unexpected, mismatched)
  if problems:
    raise CheckpointFormatError(f"state dict does not match {description}: {problems}")
  return traverse_util.unflatten_dict(out)


def variables_to_state_dict(
    variables, key_fn: KeyFn, layout_fn: LayoutFn
) -> "collections.OrderedDict[str, np.ndarray]":
  """Flax variables -> the official code's state dict as C-contiguous float32 numpy arrays."""
  sd = collections.OrderedDict()
  for path, leaf in traverse_util.flatten_dict(jax.device_get(variables)).items():
    a = np.asarray(leaf, np.float32)
    sd[key_fn(path)] = np.array(layout_fn(path, a.ndim).to_torch(a), order="C")
  return sd


def describe(name: str, config: dict, fields) -> str:
  """'Name(field=value, ...)' for error messages."""
  return f"{name}(" + ", ".join(f"{k}={config[k]}" for k in fields) + ")"
