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
import pickletools
import warnings
import zipfile

import numpy as np

from strip_mlp.errors import CheckpointFormatError, TorchNotInstalledError


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
    raise TorchNotInstalledError(
        "reading .pth files needs PyTorch: pip install 'strip-mlp-jax[convert]' "
        "(on CPU-only machines install torch's CPU build first)"
    ) from e
  return torch


def load_torch_file(path: str):
  """Unpickles `path` with PyTorch's weights-only loader (tensors stay on CPU)."""
  torch = _import_torch()
  if os.path.isdir(path):
    raise CheckpointFormatError(
        f"{path} is a directory, not a PyTorch .pth file; give the "
        "weights file written by torch.save"
    )
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path}: no such file")
  try:
    with torch.serialization.safe_globals(_DATA_ONLY_GLOBALS), warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*pickle protocol.*")
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    names = _code_globals(torch, path)
    if names:
      raise CheckpointFormatError(
          f"{path}: refused to unpickle: the file references {', '.join(names)}, which "
          "could run code; only tensors, containers and training configs are read "
          "(re-save the state dict alone with torch.save({'model': state_dict}, ...) "
          "from a trusted session)"
      ) from None
    raise CheckpointFormatError(
        f"{path}: not a PyTorch checkpoint written by torch.save " f"({_core_message(str(e))})"
    ) from None
  except Exception as e:  # pylint: disable=broad-except  # any parse failure of a bad file
    detail = _core_message(str(e))
    detail = f"{type(e).__name__}: {detail}" if len(detail) < 20 else detail
    raise CheckpointFormatError(
        f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail}"
    ) from None


def _core_message(msg: str) -> str:
  """The informative line of a PyTorch loading error, without its boilerplate."""
  boilerplate = (
      "Weights only load failed",
      "Please file an issue",
      "Check the documentation",
      "This is an internal miniz error",
  )
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith(boilerplate)] or lines[:1]
  return lines[0].split(". This is an internal")[0] if lines else ""


def _code_globals(torch, path) -> list[str]:
  """Names of classes/functions the file would import, beyond what is admitted here.

  Reads pickle opcodes only (nothing is executed).
  """
  allowed = {name for _, name in _DATA_ONLY_GLOBALS}
  if zipfile.is_zipfile(path):
    try:
      found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # pylint: disable=broad-except
      return []
  else:
    found, strings = [], []
    try:
      with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
          if op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
          elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(".".join(strings[-2:]))
          elif isinstance(arg, str):
            strings.append(arg)
    except Exception:  # pylint: disable=broad-except
      pass
  return sorted(set(found) - allowed)


def extract_state_dict(obj, source: str = "checkpoint") -> dict:
  """Finds the model state dict in a loaded checkpoint; strips `module.` prefixes.

  Accepts {'model': sd, ...} (released and training checkpoints), {'state_dict': sd}
  or a bare state dict. Returns {name: torch.Tensor}.
  """
  torch = _import_torch()
  is_sd = (
      lambda d: isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())
  )
  if not isinstance(obj, dict):
    raise CheckpointFormatError(
        f"{source}: holds a {type(obj).__name__}, not a state dict or a dict with 'model'"
    )
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
          "expected {'model': state_dict} or a bare state dict"
      )
  prefix = "module."
  if all(k.startswith(prefix) for k in sd):
    sd = {k[len(prefix) :]: v for k, v in sd.items()}
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
