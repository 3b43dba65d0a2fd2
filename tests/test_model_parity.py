"""Converted official weights reproduce the official PyTorch outputs (float32, 1e-5)."""

import jax
import numpy as np
import pytest

from conftest import FIXTURE_NAMES
from strip_mlp.convert import torch_to_flax

TOL = 1e-5
# Every op formulation stays under parity: ('xla', 'xla') is the plain-convolution model.
FORMULATIONS = [
    dict(depthwise_impl="shift", patchify_impl="einsum"),
    dict(depthwise_impl="xla", patchify_impl="xla"),
]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("impls", FORMULATIONS, ids=lambda d: "-".join(d.values()))
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_converted_weights_match_official_outputs(fixtures_dir, name, impls):
  ref = np.load(fixtures_dir / f"{name}.npz")
  model, variables = torch_to_flax(str(fixtures_dir / f"{name}.pth"), **impls)
  assert (model.embed_dim, list(model.layers), model.img_size, model.num_classes) == (
      int(ref["embed_dim"]),
      list(ref["layers"]),
      int(ref["img_size"]),
      int(ref["num_classes"]),
  )
  images = ref["input_nchw"].transpose(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
        variables, images
    )
  inter = state["intermediates"]
  errors = {
      "logits": rel_err(logits, ref["logits"]),
      "pooled": rel_err(inter["pooled"][0], ref["pooled"]),
  }
  for s in range(1, 5):
    errors[f"stage{s}"] = rel_err(inter[f"stage{s}"][0], ref[f"stage{s}"].transpose(0, 2, 3, 1))
  print(name, impls, {k: f"{v:.2e}" for k, v in errors.items()})
  assert all(e <= TOL for e in errors.values()), errors
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(ref["logits"], -1))
