"""Weights of one training resolution resampled for another: what changes, identity,
constant and smooth responses of the strip layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import FIXTURE_NAMES
from strip_mlp import StripMLP, create_model
from strip_mlp.models import ops, resample
from strip_mlp.convert import torch_to_flax
from strip_mlp.models.strip_mlp import abstract_variables

STRIP_LEAVES = {
    ("proj_h", "kernel"),
    ("proj_h", "bias"),
    ("proj_w", "kernel"),
    ("proj_w", "bias"),
    ("relate_pos_h", "embeddings_table"),
    ("relate_pos_w", "embeddings_table"),
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_only_strip_length_tensors_depend_on_the_resolution():
  shapes = lambda m: {
      k: v.shape for k, v in traverse_util.flatten_dict(abstract_variables(m)).items()
  }
  a, b = shapes(create_model("tiny_light")), shapes(create_model("tiny_light", img_size=384))
  assert a.keys() == b.keys()
  changed = {k[-2:] for k in a if a[k] != b[k]}
  assert changed == STRIP_LEAVES
  assert b[("params", "blocks1_0", "token_mixing", "smlp_block", "strip", "proj_h", "kernel")] == (
      3,
      96,
      96,
      20,
  )


@pytest.fixture(scope="module")
def fixture_model(fixtures_dir):
  return torch_to_flax(str(fixtures_dir / f"{FIXTURE_NAMES[0]}.pth"))


def test_same_resolution_is_the_identity(fixture_model):
  model, variables = fixture_model
  same = resample.resample_variables(variables, model, model)
  flat, got = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(same)
  assert flat.keys() == got.keys()
  for k in flat:
    np.testing.assert_array_equal(got[k], flat[k], err_msg=str(k))


def test_resampled_variables_fit_the_new_model(fixture_model):
  model, variables = fixture_model
  for size, classes in ((64, 10), (96, 0)):
    dst = StripMLP(**{**model.config_dict(), "img_size": size, "num_classes": classes})
    out = resample.resample_variables(variables, model, dst)
    want = traverse_util.flatten_dict(abstract_variables(dst))
    got = traverse_util.flatten_dict(out)
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    logits = jax.eval_shape(lambda v: dst.apply(v, jnp.zeros((2, size, size, 3))), out)
    assert logits.shape == (2, classes or 320)
  with pytest.raises(resample.ResampleError, match="embed_dim=40"):
    resample.resample_variables(
        variables, model, StripMLP(embed_dim=48, layers=(1, 1, 2, 1), img_size=64, num_classes=10)
    )


def _layer(length, groups=3, seed=0):
  kk, kb = jax.random.split(jax.random.PRNGKey(seed))
  return (
      np.asarray(jax.random.normal(kk, (3, length, length, groups))),
      np.asarray(jax.random.normal(kb, (length, groups))),
  )


def _strip_response(kernel, bias, signal):
  """strip_mix over 3 identical rows of `signal` (tokens, groups): the middle row."""
  x = jnp.broadcast_to(
      jnp.asarray(signal, jnp.float32)[None, None, :, None, :],
      (1, 3, *signal.shape[:1], 2, signal.shape[1]),
  )
  with jax.default_matmul_precision("highest"):
    y = ops.strip_mix(x, jnp.asarray(kernel, jnp.float32), jnp.asarray(bias, jnp.float32), "rows")
  return np.asarray(y[0, 1, :, 0], np.float64)


@pytest.mark.parametrize("src,dst", [(7, 12), (14, 24), (28, 14), (7, 3)])
def test_constant_and_smooth_inputs_keep_their_response(src, dst):
  kernel, bias = _layer(src, seed=src + dst)
  new_k = resample.resample_strip_kernel(kernel, dst)
  new_b = resample.resample_strip_bias(bias, dst)
  u = resample.resize_matrix(src, dst)
  constant = lambda n: np.full((n, 3), 0.7)
  np.testing.assert_allclose(
      _strip_response(new_k, new_b, constant(dst)),
      u @ _strip_response(kernel, bias, constant(src)),
      atol=1e-5,
  )
  # A smooth input sampled at both sizes: the new response is the interpolated old one.
  smooth = lambda n: np.cos(np.pi * (np.arange(n) + 0.5) / n)[:, None] * [1.0, -0.5, 2.0]
  want = u @ _strip_response(kernel, bias, smooth(src))
  assert rel_err(_strip_response(new_k, new_b, smooth(dst)), want) < 0.1
  # Interpolating the matrices without the input-axis scaling is far off.
  unscaled = np.einsum("ai,tiog,bo->tabg", u, kernel, u)
  assert rel_err(_strip_response(unscaled, new_b, smooth(dst)), want) > 0.3


def test_position_table_follows_the_offsets():
  offsets = np.arange(-7, 8, dtype=np.float64)
  table = np.stack([offsets, np.ones_like(offsets)], axis=1)  # (15, 2): linear, constant
  new = resample.resample_position_table(table, 12)
  assert new.shape == (25, 2)
  np.testing.assert_allclose(new[:, 0], np.arange(-12, 13) * 7 / 12, atol=1e-12)
  np.testing.assert_allclose(new[:, 1], 1.0, atol=1e-12)
  np.testing.assert_array_equal(resample.resample_position_table(table, 7), table)
