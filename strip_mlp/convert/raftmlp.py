"""Official RaftMLP state dicts <-> Flax variables, with strict accounting.

    from strip_mlp.convert.raftmlp import torch_to_flax
    model, variables = torch_to_flax("last_model_0.pt")
    logits = model.apply(variables, images_nhwc)

The official training saves plain state dicts (ignite `Checkpoint({'model': model})`) and
training states {'model': ..., 'optimizer': ...}; {'state_dict': ...} and `module.` prefixes
are accepted too (`strip_mlp.convert.torch_io`, which never runs pickled code). Every linear weight
(out, in) <-> kernel (in, out); LayerNorm parameters as they are.

Key table (Flax -> PyTorch): levels_<i> -> levels.<i>; embedding -> fn.0; blocks_<d> ->
fn.<d + 2>; vertical / horizontal / channel -> 1 / 3 / 5; fc1 / fc2 -> fn.0 / fn.3; a token
block's norm -> norm.1; the final norm -> heads.0.1; classifier -> classifier.
"""

import itertools
import math
import re

from strip_mlp.convert import torch_mapping as tm
from strip_mlp.models.raftmlp import RaftMLP, RaftMLPConfigError, level_sizes
from strip_mlp.convert.torch_io import CheckpointFormatError, read_state_dict

_BLOCKS = {"vertical": "1", "horizontal": "3", "channel": "5"}
_MLP = {"fc1": "fn.0", "fc2": "fn.3"}
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight"}
_ARCH_FIELDS = (
    "dims",
    "depths",
    "raft_sizes",
    "embedding_kernels",
    "img_size",
    "num_classes",
    "token_expansion_factor",
    "channel_expansion_factor",
)
OFFICIAL_IMG_SIZE = 224  # the `pretrained_image_size` of every released setting


def torch_key(path: tuple) -> str:
  """('params', 'levels_0', 'blocks_1', 'vertical', 'norm', 'scale') ->
  'levels.0.fn.3.1.norm.1.weight'."""
  names, parts = path[1:-1], []
  for i, name in enumerate(names):
    if m := re.match(r"(levels|blocks)_(\d+)$", name):
      parts.append(f"levels.{m[2]}" if m[1] == "levels" else f"fn.{int(m[2]) + 2}")
    elif name == "norm" and len(names) == 1:
      parts.append("heads.0.1")
    elif name == "norm":
      parts.append("norm.1" if names[i - 1] in ("vertical", "horizontal") else "norm")
    else:
      parts.append(_BLOCKS.get(name) or _MLP.get(name) or ("fn.0" if name == "embedding" else name))
  parts.append(_LEAF_RENAMES.get(path[-1], path[-1]))
  return ".".join(parts)


def leaf_layout(path: tuple, ndim: int) -> tm.Layout:
  return tm.LINEAR if path[-1] == "kernel" else tm.SAME


def is_raftmlp_state_dict(sd: dict) -> bool:
  """True for the keys of the official RaftMLP model."""
  return any(re.match(r"levels\.\d+\.fn\.0\.fc\.weight$", k) for k in sd)


def _kernel_sets(s: int) -> list:
  """Kernel tuples (p, m2*p, ...), m ascending from 1, with p^2 * sum(m^2) == s and every
  (m - 1) * p even: the embeddings whose Unfold features number s per input channel."""
  found = []

  def extend(p, rest, m_min, ms):
    if rest == 0:
      found.append(tuple(m * p for m in ms))
    for m in range(m_min, math.isqrt(rest) + 1):
      if (m - 1) * p % 2 == 0:
        extend(p, rest - m * m, m + 1, ms + (m,))

  for p in range(1, math.isqrt(s) + 1):
    if s % (p * p) == 0:
      extend(p, s // (p * p) - 1, 2, (1,))
  return found


def _fit(img_size, kernels, dims, token_dims):
  """raft_sizes making each level's token MLP width r*h, or None if these sizes do not fit."""
  try:
    sizes = level_sizes(img_size, kernels)
  except RaftMLPConfigError:
    return None
  rafts = []
  for size, dim, width in zip(sizes, dims, token_dims):
    r = 1 if width is None else width // size
    if width is not None and (width % size or dim % r):
      return None
    rafts.append(r)
  return tuple(rafts)


def _solutions(dims, token_dims, kernel_options, img_size):
  """Every (img_size, kernels, raft_sizes) giving these parameter shapes."""
  first = next((i for i, w in enumerate(token_dims) if w is not None), None)
  found = []
  for kernels in itertools.product(*kernel_options):
    if img_size is not None:
      sizes = {img_size}
    elif first is None:
      raise CheckpointFormatError(
          "RaftMLP state dict without any blocks: its image size "
          "cannot be read from the shapes; give img_size"
      )
    else:
      stride = math.prod(ks[0] for ks in kernels[: first + 1])
      width = token_dims[first]
      sizes = {
          width // r * stride
          for r in range(1, width + 1)
          if width % r == 0 and dims[first] % r == 0
      }
    for size in sorted(sizes):
      rafts = _fit(size, kernels, dims, token_dims)
      if rafts is not None:
        found.append((size, kernels, rafts))
  return found


def _levels(sd: dict) -> int:
  n = 0
  while f"levels.{n}.fn.0.fc.weight" in sd:
    n += 1
  return n


def infer_architecture(sd: dict, img_size=None) -> dict:
  """RaftMLP keywords read from the keys and shapes.

  Image size, raft sizes and patch kernels are only determined together; when several
  image sizes fit, the official 224 is taken if it is one of them, else `img_size` must
  be given (a one-line CheckpointFormatError says so).
  """
  if not is_raftmlp_state_dict(sd):
    raise CheckpointFormatError(
        f"not a RaftMLP state dict: no 'levels.<i>.fn.0.fc.weight' keys (keys start with "
        f"{sorted(sd)[:4]}); convert weights of the official RaftMLP"
    )
  n = _levels(sd)
  dims = [int(sd[f"levels.{i}.fn.0.fc.weight"].shape[0]) for i in range(n)]
  depths = [
      len({int(m[1]) for k in sd if (m := re.match(rf"levels\.{i}\.fn\.(\d+)\.\d", k))})
      for i in range(n)
  ]
  kernel_options, token_dims, factors = [], [], {}
  for i in range(n):
    c_in = dims[i - 1] if i else 3
    width = sd[f"levels.{i}.fn.0.fc.weight"].shape[1]
    kernel_options.append(_kernel_sets(width // c_in) if width % c_in == 0 else [])
    token = sd.get(f"levels.{i}.fn.2.1.fn.0.weight")
    token_dims.append(None if token is None else int(token.shape[1]))
    if token is not None:
      channel = sd[f"levels.{i}.fn.2.5.fn.0.weight"].shape
      factors = dict(
          token_expansion_factor=token.shape[0] // token.shape[1],
          channel_expansion_factor=channel[0] // channel[1],
      )
  found = _solutions(dims, token_dims, kernel_options, img_size)
  if img_size is None and any(s[0] == OFFICIAL_IMG_SIZE for s in found):
    found = [s for s in found if s[0] == OFFICIAL_IMG_SIZE]
  if len(found) != 1:
    what = (
        f"fits image sizes {sorted({s[0] for s in found})} with different raft sizes or " "kernels"
        if found
        else "fits no RaftMLP image size / raft size / kernel choice"
    )
    raise CheckpointFormatError(
        f"RaftMLP state dict with dims {dims} {what}; pass img_size=<its training size>, or "
        "build the RaftMLP yourself and use state_dict_to_variables(sd, model)"
    )
  size, kernels, rafts = found[0]
  return dict(
      dims=tuple(dims),
      depths=tuple(depths),
      raft_sizes=rafts,
      embedding_kernels=kernels,
      img_size=size,
      num_classes=int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0,
      **factors,
  )


def state_dict_to_variables(sd: dict, model: RaftMLP) -> dict:
  """Every Flax variable of `model` from `sd` ({key: array}); strict, one-line errors."""
  return tm.state_dict_to_variables(
      sd,
      tm.abstract_variables(model, model.img_size),
      torch_key,
      leaf_layout,
      tm.describe("RaftMLP", model.config_dict(), _ARCH_FIELDS),
  )


def variables_to_state_dict(variables):
  """Flax variables -> the official model's state dict (OrderedDict of numpy arrays)."""
  return tm.variables_to_state_dict(variables, torch_key, leaf_layout)


def torch_to_flax(path: str, img_size=None, **model_overrides):
  """Reads an official `.pt` / `.pth` -> (RaftMLP, variables), same function.

  The architecture is read from the weights (`img_size` only where the shapes leave it
  open); `model_overrides` may set dtype and drop_path_rate.
  """
  sd = read_state_dict(path)
  arch = infer_architecture(sd, img_size)
  clash = set(_ARCH_FIELDS) & set(model_overrides)
  if clash:
    raise RaftMLPConfigError(f"{sorted(clash)} are read from the weights and cannot be overridden")
  model = RaftMLP(**arch, **model_overrides)
  return model, state_dict_to_variables(sd, model)
