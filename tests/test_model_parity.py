"""Converted official weights reproduce the official PyTorch outputs (float32, 1e-5).

The fixtures are tests/fixtures/strip_mlp/*.npz, made by the official code from weights that
tests/synthetic_weights.py rebuilds (see tests/fixtures/strip_mlp/make_fixtures.py)."""

import json

import jax
import numpy as np
import pytest
import torch

import synthetic_weights
from conftest import FIXTURE_NAMES, FIXTURES
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


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_weights_are_rebuilt_exactly_and_far_from_init(fixtures_dir, name):
  with np.load(FIXTURES / f"{name}.npz") as z:
    description = str(z["weights"])
  sd = synthetic_weights.rebuild(description)
  saved = torch.load(fixtures_dir / f"{name}.pth", weights_only=True)["model"]
  assert list(saved) == list(sd)  # the official model's keys, in its order
  for k, v in sd.items():
    np.testing.assert_array_equal(saved[k].numpy(), v, err_msg=k)
  # BatchNorm statistics, norm scales, GRN, position tables and biases are all non-trivial.
  for suffix, low, high in [
      ("running_var", 0.5, 1.5),
      ("running_mean", -0.2, 0.2),
      ("BN.weight", 0.8, 1.2),
      ("grn.gamma", -0.2, 0.2),
      ("embeddings_table", -0.1, 0.1),
      ("fc1.bias", -0.1, 0.1),
  ]:
    values = np.concatenate([v.ravel() for k, v in sd.items() if k.endswith(suffix)])
    assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() < high, suffix
  changed = json.loads(description)
  changed["seed"] += 1
  with pytest.raises(ValueError, match="regenerate the fixture"):
    synthetic_weights.rebuild(json.dumps(changed))
