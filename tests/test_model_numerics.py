"""Numerical hazards forced on purpose: exact zeros, 1x1 maps, a batch of one, bfloat16.

Whether such a zero occurs by chance depends on rounding order (fusion, kernels, CPU), so
every case here builds it deterministically and checks that the jitted gradients are
finite and equal to a reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


from strip_mlp import StripMLP
from strip_mlp.train.mixup import mixup_cutmix
from strip_mlp.models.strip_mlp_layers import GRN, spatial_l2_norm
from strip_mlp.train.steps import soft_cross_entropy

# One block in stage 1 (8x8 maps) and stage 4 (1x1 maps): the hazards, at half the compile.
TINY = dict(embed_dim=16, layers=(1, 0, 0, 1), img_size=32, num_classes=10, drop_path_rate=0.0)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _torch_grn(x, gamma, beta):
  """The official GRN (torch.norm over H, W of an NHWC tensor), float64."""
  gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
  nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
  return gamma * (x * nx) + beta + x


def _grn_inputs(case):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 3, 6)).astype(np.float32)
  if case == "zeroed_channel":
    x[:, :, :, 2] = 0.0
  elif case == "one_by_one":
    x = x[:, :1, :1]
    x[0, 0, 0, 1] = 0.0
  elif case == "all_zero":
    x[:] = 0.0
  return x


@pytest.mark.parametrize("case", ["zeroed_channel", "one_by_one", "all_zero"])
def test_grn_gradient_is_torch_norms_at_exact_zeros(case):
  x = _grn_inputs(case)
  c = x.shape[-1]
  gamma = np.linspace(-1, 1, c, dtype=np.float32).reshape(1, 1, 1, c)
  beta = np.linspace(0.5, -0.5, c, dtype=np.float32).reshape(1, 1, 1, c)
  weights = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  variables = {"params": {"gamma": gamma, "beta": beta}}

  def loss(x):
    return jnp.sum(GRN().apply(variables, x) * weights)

  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(x))

  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  out = _torch_grn(
      xt, torch.tensor(gamma, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
  )
  ref = (out * torch.tensor(weights, dtype=torch.float64)).sum()
  ref.backward()
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, ref.item(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_spatial_l2_norm_values_and_zero_gradient():
  x = jnp.asarray(_grn_inputs("zeroed_channel"))
  np.testing.assert_array_equal(
      spatial_l2_norm(x), jnp.sqrt(jnp.sum(x * x, axis=(1, 2), keepdims=True))
  )
  grad = jax.grad(lambda x: jnp.sum(spatial_l2_norm(x)))(x)
  np.testing.assert_array_equal(grad[..., 2], 0.0)
  bf16 = jax.grad(lambda x: jnp.sum(spatial_l2_norm(x)))(jnp.zeros((1, 1, 1, 4), jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16 and not np.any(np.isnan(np.asarray(bf16, np.float32)))


# ----------------------------------------------------------------------------- whole model
DEAD = -30.0  # fc1 bias that makes GELU's output exactly 0 in float32 and bfloat16


@functools.lru_cache(maxsize=None)
def _forced_zero_variables():
  """Tiny-model variables where GRN sees exact zeros: channels 0-1 of fc1 in stage 1
  (an 8x8 map) and stage 4 (a 1x1 map) have bias -30, so GELU gives exactly 0 there."""
  model = StripMLP(**TINY)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0)
  )
  params = jax.tree_util.tree_map(np.array, variables["params"])
  for block in ("blocks1_0", "blocks4_0"):
    params[block]["channel_mixing"]["fc1"]["bias"][:2] = DEAD
  return params, variables["batch_stats"]


def _images():
  """A batch of one (BatchNorm over one 1x1 map: x - mean is exactly 0 in stage 4) of
  noise, and an all-zero image."""
  noise = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
  return {"noise": noise, "zeros": np.zeros_like(noise)}


@functools.lru_cache(maxsize=None)
def _grad_fn(dtype, depthwise_impl, patchify_impl):
  model = StripMLP(**TINY, dtype=dtype, depthwise_impl=depthwise_impl, patchify_impl=patchify_impl)

  def loss(params, batch_stats, images):
    logits, _ = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images.astype(dtype),
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.mean(soft_cross_entropy(logits, jax.nn.one_hot(jnp.array([3]), 10)))

  return jax.jit(jax.value_and_grad(loss))


def _loss_and_grads(images, dtype, impls):
  params, batch_stats = _forced_zero_variables()
  cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)
  if dtype == "float64":
    params, batch_stats = cast(params), cast(batch_stats)
  loss, grads = _grad_fn(dtype, *impls)(params, batch_stats, jnp.asarray(images))
  flat = np.concatenate(
      [np.ravel(np.asarray(g, np.float64)) for g in jax.tree_util.tree_leaves(grads)]
  )
  return float(loss), flat


@functools.lru_cache(maxsize=None)
def _float64_reference():
  """Loss and gradients of the noise batch in float64 (any formulation: they agree)."""
  with jax.default_matmul_precision("highest"), jax.enable_x64(True):
    return _loss_and_grads(_images()["noise"], "float64", ("xla", "einsum"))


IMPLS = [("shift", "einsum"), ("xla", "xla")]


@pytest.mark.parametrize("impls", IMPLS)
def test_model_gradients_at_exact_zeros_float32(impls):
  """Jitted float32 gradients equal the float64 ones where GRN sees exact zeros."""
  images = _images()
  ref_loss, ref_grads = _float64_reference()
  with jax.default_matmul_precision("highest"):
    loss, grads = _loss_and_grads(images["noise"], "float32", impls)
    zero_loss, zero_grads = _loss_and_grads(images["zeros"], "float32", impls)
  assert np.all(np.isfinite(grads)) and np.linalg.norm(ref_grads) > 0
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert rel_err(grads, ref_grads) < 1e-4
  # all-zero image: BatchNorm at zero variance makes the values rounding noise, so only
  # finiteness is meaningful here
  assert np.isfinite(zero_loss) and np.all(np.isfinite(zero_grads))


@pytest.mark.parametrize("impls", IMPLS)
def test_model_gradients_at_exact_zeros_bfloat16(impls):
  """bfloat16 gradients are finite and close to the exact ones where GRN sees exact zeros."""
  images = _images()
  ref_loss, ref_grads = _float64_reference()
  loss, grads = _loss_and_grads(images["noise"], "bfloat16", impls)
  zero_loss, zero_grads = _loss_and_grads(images["zeros"], "bfloat16", impls)
  assert np.all(np.isfinite(grads))
  np.testing.assert_allclose(loss, ref_loss, rtol=0.05)
  assert rel_err(grads, ref_grads) < 0.1
  assert np.isfinite(zero_loss) and np.all(np.isfinite(zero_grads))


# ----------------------------------------------------------------------------- mixup
@pytest.mark.parametrize("lam_case", ["mixup_alpha_tiny", "cutmix_alpha_tiny"])
def test_mixup_extreme_lambdas_are_finite(lam_case):
  """Beta(a, a) with a tiny alpha draws lambda at (or next to) exactly 0 or 1."""
  images = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
  labels = jnp.arange(4) % 3
  kw = (
      dict(mixup_alpha=1e-3, cutmix_alpha=0.0)
      if lam_case == "mixup_alpha_tiny"
      else dict(mixup_alpha=0.0, cutmix_alpha=1e-3)
  )
  for seed in range(8):
    out, targets = mixup_cutmix(jax.random.PRNGKey(seed), images, labels, 3, **kw)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(targets))
    np.testing.assert_allclose(np.sum(targets, -1), 1.0, rtol=1e-6)
