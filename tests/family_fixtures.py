"""Helpers for the model-family tests: fixtures of the official code, abstract state dicts."""
import json
import pathlib

import numpy as np
import torch
from flax import traverse_util

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def load(family: str, name: str) -> dict:
  """An official-code fixture: sd (state dict of numpy arrays), config, images (NHWC),
  logits, stages (NHWC list)."""
  with np.load(FIXTURES / family / f"{name}.npz") as z:
    stages = sorted((k for k in z.files if k.startswith("stage")), key=lambda k: int(k[5:]))
    return dict(sd={k[3:]: z[k] for k in z.files if k.startswith("sd/")},
                config=json.loads(str(z["config"])),
                images=z["input_nchw"].transpose(0, 2, 3, 1), logits=z["logits"],
                stages=[z[k].transpose(0, 2, 3, 1) for k in stages])


def abstract_state_dict(abstract, torch_key, leaf_layout) -> dict:
  """{key: zero-strided array of the PyTorch shape} for abstract Flax variables (no memory)."""
  sd = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    shape = leaf_layout(path, len(leaf.shape)).to_torch(
        np.broadcast_to(np.float32(0), leaf.shape)).shape
    sd[torch_key(path)] = np.broadcast_to(np.float32(0), shape)
  return sd


def save_pth(path, sd: dict, wrap: str):
  """torch.save of `sd` as a released file would hold it: 'plain', 'model', 'state_dict' or
  'module' (DataParallel prefixes in a {'model': ...} training state)."""
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  obj = {"plain": tensors, "model": {"model": tensors, "epoch": 3},
         "state_dict": {"state_dict": tensors},
         "module": {"model": {f"module.{k}": v for k, v in tensors.items()},
                    "optimizer": {"state": {}, "param_groups": []}}}[wrap]
  torch.save(obj, path)
