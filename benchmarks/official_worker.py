r"""The official PyTorch Strip-MLP in a process of its own, timed step by step for the benchmark.

    python benchmarks/official_worker.py OFFICIAL_CODE INPUTS.npz ARCH_JSON THREADS DTYPE

OFFICIAL_CODE: a checkout of the official code (its `models/strip_mlp.py` is imported from
there). INPUTS.npz: `images` (N, 3, R, R) float32 and `labels` (N,) integers, the same
inputs our model gets. ARCH_JSON: StripMLPNet keyword arguments (img_size, embed_dim,
layers, num_classes). THREADS: torch threads (0: torch's default). DTYPE: float32, or
bfloat16 (autocast). Speaks `bench_util.serve`'s protocol: modes `inference` (eval mode, no
grad) and `train` (cross-entropy, backward, AdamW step).

The official module imports `timm.models.layers` (to_2tuple, trunc_normal_, DropPath) and
`matplotlib.pyplot.axis` (unused). Where those packages are not installed, small stand-ins
written here are registered in their place: the timed computation is the same.
"""

import json
import os
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top


class _DropPath(torch.nn.Module):
  """Stochastic depth per example: kept paths scaled by 1 / (1 - p), as timm's."""

  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if not self.training or self.drop_prob == 0.0:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
  return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)


def _to_2tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _register_stand_ins() -> None:
  """Registers the stand-in modules for the official code's imports that are missing here."""
  try:
    import timm.models.layers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    layers = types.ModuleType("timm.models.layers")
    layers.to_2tuple, layers.trunc_normal_, layers.DropPath = (_to_2tuple, _trunc_normal, _DropPath)
    models = types.ModuleType("timm.models")
    models.layers = layers
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
  try:
    import matplotlib.pyplot  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.axis = None
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.pyplot = pyplot
    sys.modules.update({"matplotlib": matplotlib, "matplotlib.pyplot": pyplot})


def main(argv):
  checkout, inputs, arch, threads, dtype = argv
  sys.path.insert(0, os.path.abspath(checkout))
  _register_stand_ins()
  try:
    from models.strip_mlp import StripMLPNet  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    bench_util.fail_to_start(f"cannot import models.strip_mlp from {checkout}: {e}")
  if int(threads):
    torch.set_num_threads(int(threads))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  data = np.load(inputs)
  images = torch.from_numpy(data["images"]).to(device)
  labels = torch.from_numpy(data["labels"].astype(np.int64)).to(device)
  net = StripMLPNet(**json.loads(arch)).to(device)
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)

  def step(mode):
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if mode == "inference":
      net.eval()
      with torch.no_grad(), autocast:
        net(images)
    else:
      net.train()
      with autocast:
        loss = torch.nn.functional.cross_entropy(net(images), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  bench_util.serve(
      {
          "device": device,
          "torch_threads": torch.get_num_threads(),
          "allocator": bench_util.allocator(),
      },
      step,
  )


if __name__ == "__main__":
  main(sys.argv[1:])
