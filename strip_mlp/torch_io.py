"""Reading PyTorch `.pth` files safely, without executing code stored in them.

Files are read with PyTorch's restricted (`weights_only`) unpickler, which builds only
tensors and plain containers. Released Strip-MLP training checkpoints also pickle their
yacs `CfgNode` config; it is admitted as an inert ordered dict (yacs itself need not be
installed). Anything else that names a global (a class or function) is refused.
"""
import argparse
import collections
import os
import pickle
import zipfile

import numpy as np


class CheckpointFormatError(ValueError):
  """A file that is not a usable Strip-MLP checkpoint; the message says what to do."""


class _InertConfigNode:
  """Stands in for `yacs.config.CfgNode` while unpickling: becomes an OrderedDict."""

  def __new__(cls, *args, **kwargs):
    return collections.OrderedDict()


# Non-tensor objects a training checkpoint may carry, by their pickled name.
_DATA_ONLY_GLOBALS = [
    (_InertConfigNode, "yacs.config.CfgNode"),
    (argparse.Namespace, "argparse.Namespace"),
]


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "reading .pth files needs PyTorch: pip install 'strip-mlp-jax[convert]' "
        "(on CPU-only machines install torch's CPU build first)") from e
  return torch


def load_torch_file(path: str):
  """Unpickles `path` with PyTorch's weights-only loader (tensors stay on CPU)."""
  torch = _import_torch()
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path}: no such file")
  try:
    with torch.serialization.safe_globals(_DATA_ONLY_GLOBALS):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    msg = str(e)
    if "Unsupported global" in msg or "unsupported GLOBAL" in msg or "reduce for" in msg:
      names = _unsafe_globals(torch, path) or [msg.split("\n")[0]]
      raise CheckpointFormatError(
          f"{path}: refused to unpickle: the file references {', '.join(names)}, which "
          "could run code; only tensors, containers and training configs are read "
          "(re-save the state dict alone with torch.save({'model': state_dict}, ...) "
          "from a trusted session)") from None
    raise CheckpointFormatError(
        f"{path}: not a PyTorch checkpoint written by torch.save ({msg.splitlines()[0]})"
    ) from None
  except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointFormatError(
        f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt file?): {first}"
    ) from None


def _unsafe_globals(torch, path):
  try:
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # pylint: disable=broad-except
    return []
  allowed = {name for _, name in _DATA_ONLY_GLOBALS}
  return [g for g in found if g not in allowed]


def extract_state_dict(obj, source: str = "checkpoint") -> dict:
  """Finds the model state dict in a loaded checkpoint; strips `module.` prefixes.

  Accepts {'model': sd, ...} (released and training checkpoints), {'state_dict': sd}
  or a bare state dict. Returns {name: torch.Tensor}.
  """
  torch = _import_torch()
  is_sd = lambda d: isinstance(d, dict) and d and all(
      isinstance(v, torch.Tensor) for v in d.values())
  if not isinstance(obj, dict):
    raise CheckpointFormatError(
        f"{source}: holds a {type(obj).__name__}, not a state dict or a dict with 'model'")
  if is_sd(obj):
    sd = obj
  else:
    for key in ("model", "state_dict", "model_state_dict"):
      if is_sd(obj.get(key)):
        sd = obj[key]
        break
    else:
      raise CheckpointFormatError(
          f"{source}: no state dict found (top-level keys: {sorted(map(str, obj))[:8]}); "
          "expected {'model': state_dict} or a bare state dict")
  prefix = "module."
  if all(k.startswith(prefix) for k in sd):
    sd = {k[len(prefix):]: v for k, v in sd.items()}
  return dict(sd)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a Strip-MLP `.pth` as {state_dict key: numpy array} (floats as float32).

  `num_batches_tracked` counters are dropped (they do not affect the function).
  """
  sd = extract_state_dict(load_torch_file(path), path)
  out = {}
  for k, v in sd.items():
    if k.endswith("num_batches_tracked"):
      continue
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out
