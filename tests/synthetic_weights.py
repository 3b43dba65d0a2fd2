"""Deterministic, platform-independent weights for a PyTorch state dict, from names and shapes.

A reference fixture then stores only the tensor names and shapes, a seed and a checksum
instead of megabytes of weights (tests/fixtures/strip_mlp/make_fixtures.py writes such
fixtures; tests/conftest.py rebuilds their state dicts).

Every element is integer-hash arithmetic (splitmix64 on uint64, which wraps the same on every
platform) mapped to a 24-bit uniform u in [0, 1), then `low + (high - low) * u` in float64
(IEEE, correctly rounded) cast to float32: the same bits on every machine and numpy version.
The stream of a tensor depends on the seed and on its name only (not on its position).

Ranges by name (the kinds a Strip-MLP state dict holds, all far from PyTorch's init):
  *.num_batches_tracked          int64 zeros (shape as given)
  *.running_var                  U(0.5, 1.5)   (positive)
  *.running_mean                 U(-0.2, 0.2)
  *.embeddings_table             U(-0.1, 0.1)  (relative position tables)
  *.gamma, *.beta                U(-0.2, 0.2)  (GRN)
  other 1-D *.weight             U(0.8, 1.2)   (BatchNorm / LayerNorm scales)
  *.bias                         U(-0.1, 0.1)
  other weights (ndim >= 2)      U(-b, b), b = 1 / sqrt(prod(shape[1:]))  (PyTorch's bound)
"""

import hashlib
import json
import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def uniform01(stream: int, n: int) -> np.ndarray:
  """n float64 values in [0, 1) on a grid of 2**-24, from stream `stream` (< 2**64)."""
  with np.errstate(over="ignore"):
    z = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN + np.full(n, stream, np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def value_range(key: str, shape: tuple) -> tuple:
  """(low, high) of the uniform distribution of tensor `key`; None for integer counters."""
  leaf = key.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return None
  fixed = {
      "running_var": (0.5, 1.5),
      "running_mean": (-0.2, 0.2),
      "embeddings_table": (-0.1, 0.1),
      "gamma": (-0.2, 0.2),
      "beta": (-0.2, 0.2),
      "bias": (-0.1, 0.1),
  }
  if leaf in fixed:
    return fixed[leaf]
  if len(shape) == 1:
    return (0.8, 1.2)
  bound = 1.0 / float(np.sqrt(float(np.prod(shape[1:]))))
  return (-bound, bound)


def tensor(key: str, shape, seed: int) -> np.ndarray:
  """The tensor named `key` of `shape` (float32, or int64 zeros for num_batches_tracked)."""
  shape = tuple(int(d) for d in shape)
  bounds = value_range(key, shape)
  if bounds is None:
    return np.zeros(shape, np.int64)
  stream = (int(seed) << 32) | zlib.crc32(key.encode())
  u = uniform01(stream, int(np.prod(shape, dtype=np.int64)))
  low, high = bounds
  return (low + (high - low) * u).astype(np.float32).reshape(shape)


def state_dict(spec: list, seed: int) -> dict:
  """{key: array} for `spec` = [[key, shape], ...], in that order."""
  return {key: tensor(key, shape, seed) for key, shape in spec}


def checksum(sd: dict) -> str:
  """sha256 hex of the names, shapes, dtypes and little-endian bytes of `sd`, in order."""
  h = hashlib.sha256()
  for key, v in sd.items():
    v = np.asarray(v)
    h.update(json.dumps([key, list(v.shape), v.dtype.str[1:]]).encode())
    h.update(np.ascontiguousarray(v, v.dtype.newbyteorder("<")).tobytes())
  return h.hexdigest()


def describe(sd: dict, seed: int) -> str:
  """The JSON a fixture stores to rebuild `sd` (made by `state_dict`) and to check it."""
  spec = [[key, list(np.shape(v))] for key, v in sd.items()]
  return json.dumps({"seed": int(seed), "tensors": spec, "sha256": checksum(sd)})


def rebuild(description: str) -> dict:
  """The state dict a `describe` JSON names; raises ValueError if its checksum differs."""
  d = json.loads(description)
  sd = state_dict(d["tensors"], d["seed"])
  if checksum(sd) != d["sha256"]:
    raise ValueError(
        "synthetic weights differ from the ones the fixture was made with "
        "(tests/synthetic_weights.py changed?); regenerate the fixture"
    )
  return sd
