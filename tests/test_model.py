"""Model tests: exact sizes, the strip layer against references, formulations, training mode."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from strip_mlp import StripMLP, VARIANTS, count_params, create_model
from strip_mlp.models import ops
from strip_mlp.models import strip_mlp_layers
from strip_mlp.models.strip_mlp import abstract_variables

TINY = dict(embed_dim=16, layers=(1, 1, 1, 1), img_size=32, num_classes=10)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.lru_cache(maxsize=None)
def tiny_variables(**overrides):
  model = StripMLP(**{**TINY, **dict(overrides)})
  init = jax.jit(lambda k: model.init(k, jnp.zeros((2, 32, 32, 3)), train=False))
  return model, init(jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "variant,expected",
    [("tiny_light", 18_243_920), ("tiny", 24_903_920), ("small", 42_568_600), ("base", 57_216_480)],
)
def test_parameter_count_matches_released_models(variant, expected):
  model = create_model(variant)
  assert (model.img_size, model.num_classes) == (224, 1000)
  assert count_params(abstract_variables(model)["params"]) == expected


def test_variants_table():
  assert VARIANTS["tiny_light"] == dict(embed_dim=80, layers=(2, 2, 6, 2))
  assert create_model("base", img_size=64).layers == (2, 2, 18, 2)
  with pytest.raises(ValueError, match="unknown variant"):
    create_model("huge")


def _strip_mix_loop(x, kernel, bias, along):
  """Literal sum of the spec, zero padding explicit. x: (N, H, W, P, G)."""
  x, kernel, bias = map(np.asarray, (x, kernel, bias))
  if along == "cols":  # transpose the spatial axes and reuse the row formula
    return _strip_mix_loop(x.transpose(0, 2, 1, 3, 4), kernel, bias, "rows").transpose(
        0, 2, 1, 3, 4
    )
  n, h, w, p, g = x.shape
  y = np.zeros_like(x, dtype=np.float64)
  for i in range(h):
    for v in range(w):
      acc = np.broadcast_to(bias[v], (n, p, g)).astype(np.float64)
      for k in range(3):
        if 0 <= i + k - 1 < h:
          acc = acc + np.einsum("nwpg,wg->npg", x[:, i + k - 1], kernel[k, :, v])
      y[:, i, v] = acc
  return y


def _strip_mix_grouped_conv(x, kernel, bias, along):
  """The released PyTorch formulation: a grouped (1, 3) conv over strips, in lax."""
  n, h, w, p, g = x.shape
  length = w
  if along == "cols":
    x = x.transpose(0, 2, 1, 3, 4)  # mixing axis last-spatial, as in the rows case
  # channels (g, position) as in PyTorch: index g * L + position; spatial (p, shift axis)
  lhs = x.transpose(0, 4, 2, 3, 1).reshape(n, g * length, p, h)
  rhs = np.asarray(kernel).transpose(3, 2, 1, 0).reshape(g * length, length, 1, 3)
  out = lax.conv_general_dilated(
      lhs,
      rhs,
      (1, 1),
      ((0, 0), (1, 1)),
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
      feature_group_count=g,
  )
  out = out + np.asarray(bias).T.reshape(1, g * length, 1, 1)
  out = out.reshape(n, g, length, p, h).transpose(0, 4, 2, 3, 1)
  return out.transpose(0, 2, 1, 3, 4) if along == "cols" else out


@pytest.mark.parametrize("order", ["shift_first", "mix_first"])
@pytest.mark.parametrize("along", ["rows", "cols"])
@pytest.mark.parametrize("shape", [(2, 5, 5, 2, 3), (1, 8, 8, 4, 1), (1, 1, 1, 1, 2)])
def test_strip_mix_matches_loop_and_grouped_conv(along, shape, order):
  kx, kk, kb = jax.random.split(jax.random.PRNGKey(len(shape) + shape[1]), 3)
  n, h, w, p, g = shape
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (3, w, w, g))
  bias = jax.random.normal(kb, (w, g))
  with jax.default_matmul_precision("highest"):
    got = ops.strip_mix(x, kernel, bias, along, order)
    conv = _strip_mix_grouped_conv(x, kernel, bias, along)
  loop = _strip_mix_loop(x, kernel, bias, along)
  assert got.shape == x.shape
  assert rel_err(got, loop) < 1e-6
  assert rel_err(conv, loop) < 1e-6
  # The first and last strips see one zero-padded neighbour: check them on their own.
  edge = (slice(None), 0) if along == "rows" else (slice(None), slice(None), 0)
  assert rel_err(got[edge], loop[edge]) < 1e-6


@pytest.mark.parametrize("along", ["rows", "cols"])
def test_strip_mix_orders_have_the_same_gradients(along):
  kx, kk, kb = jax.random.split(jax.random.PRNGKey(7), 3)
  x = jax.random.normal(kx, (2, 6, 6, 2, 3))
  args = (x, jax.random.normal(kk, (3, 6, 6, 3)), jax.random.normal(kb, (6, 3)))
  loss = lambda order: lambda *a: jnp.sum(jnp.sin(ops.strip_mix(*a, along, order)))
  with jax.default_matmul_precision("highest"):
    shift_first = jax.grad(loss("shift_first"), argnums=(0, 1, 2))(*args)
    mix_first = jax.grad(loss("mix_first"), argnums=(0, 1, 2))(*args)
  for a, b in zip(mix_first, shift_first):
    assert rel_err(a, b) < 1e-6


def test_strip_mix_rejects_unknown_direction_or_order():
  args = (jnp.zeros((1, 4, 4, 1, 1)), jnp.zeros((3, 4, 4, 1)), jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match="rows"):
    ops.strip_mix(*args, "diag")
  with pytest.raises(ValueError, match="shift_first"):
    ops.strip_mix(*args, "rows", "sideways")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_to_each_is_broadcasting_add_with_its_gradients(dtype):
  kx, kt = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(kx, (5, 4, 3, 2)).astype(dtype)
  table = jax.random.normal(kt, (4, 3, 2)).astype(dtype)
  loss = lambda add: lambda x, t: jnp.sum(jnp.sin(add(x, t).astype(jnp.float32)))
  got = jax.jit(jax.grad(loss(ops.add_to_each), argnums=(0, 1)))(x, table)
  ref = jax.grad(loss(jnp.add), argnums=(0, 1))(x, table)
  assert jnp.array_equal(ops.add_to_each(x, table), x + table)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(got, ref):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < tol
  # Both ways of summing the batch, whichever the backend picks.
  g = jax.random.normal(kx, (5, 4, 3, 2))
  assert rel_err(ops._sum_leading_by_product(g), ops._sum_leading(g)) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 6), (1, 1, 1, 6), (6,)])
def test_linear_is_dense_with_its_gradients(dtype, shape):
  kx, kk = jax.random.split(jax.random.PRNGKey(4))
  x = jax.random.normal(kx, shape).astype(dtype)
  kernel = jax.random.normal(kk, (6, 4)).astype(dtype)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k).astype(jnp.float32)))
  with jax.default_matmul_precision("highest"):
    assert jnp.array_equal(ops.linear(x, kernel), x @ kernel)
    got = jax.jit(jax.grad(loss(ops.linear), argnums=(0, 1)))(x, kernel)
    ref = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, kernel)
    # The kernel's gradient both ways, whichever the backend picks.
    g = jax.random.normal(kk, (*shape[:-1], 4)).astype(dtype)
    by_matrix, plain = ops._weight_grad_by_matrix(x, g), ops._weight_grad(x, g)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(got, ref):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < tol
  assert by_matrix.shape == plain.shape == kernel.shape
  assert rel_err(by_matrix.astype(jnp.float32), plain.astype(jnp.float32)) < tol


def test_dense_module_is_flax_dense():
  """Same parameter tree and the same function as nn.Dense, so checkpoints carry over."""
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 3, 6))
  ours, flax_dense = strip_mlp_layers.dense(4, 6, name="fc"), nn.Dense(4)
  params = ours.init(jax.random.PRNGKey(6), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, flax_dense.init(jax.random.PRNGKey(6), x)
  )
  with jax.default_matmul_precision("highest"):
    assert rel_err(ours.apply(params, x), flax_dense.apply(params, x)) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 6), (1, 1, 1, 6), (6,)])
@pytest.mark.parametrize("zeros", [False, True])
def test_layer_norm_is_flax_layer_norm_with_its_gradients(dtype, shape, zeros):
  """Same parameters and function as nn.LayerNorm(use_fast_variance=False), gradients
  included, also where the variance is exactly 0 (all-zero input)."""
  kx, kp = jax.random.split(jax.random.PRNGKey(7))
  x = jnp.zeros(shape) if zeros else 3.0 * jax.random.normal(kx, shape) + 1.0
  x = x.astype(dtype)
  ours = strip_mlp_layers.LayerNorm(1e-5, dtype)
  theirs = nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False)
  params = theirs.init(kp, x)
  assert jax.tree.map(jnp.shape, ours.init(kp, x)) == jax.tree.map(jnp.shape, params)
  params = jax.tree.map(lambda p: p + jax.random.normal(kp, p.shape), params)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))
  with jax.default_matmul_precision("highest"):
    got, ref = jax.jit(ours.apply)(params, x), theirs.apply(params, x)
    g_got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    g_ref = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    # Both formulations of the statistics and their gradients, whichever the backend picks.
    x32 = x.astype(jnp.float32)
    pick = lambda f: lambda x: jnp.sum(jnp.sin(f(x)[0]) + jnp.cos(f(x)[1]))
    by_product, plain = ops._moments_by_product(x32), ops._moments(x32)
    d_product, d_plain = jax.grad(pick(ops._moments_by_product))(x32), jax.grad(pick(ops._moments))(
        x32
    )
  close = (
      lambda a, b, tol: rel_err(a, b) < tol if np.any(np.asarray(b, np.float64)) else not np.any(a)
  )
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
  assert close(got.astype(jnp.float32), ref.astype(jnp.float32), tol)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    assert a.dtype == b.dtype and bool(jnp.all(jnp.isfinite(a)))
    assert close(a.astype(jnp.float32), b.astype(jnp.float32), (1e-5 if tol < 1e-3 else tol))
  for a, b in zip(by_product, plain):
    assert a.shape == b.shape == (*shape[:-1], 1)
    assert close(a, b, 1e-6)
  assert close(d_product, d_plain, 1e-6)


def assert_formulations_agree(op, impl, ref_impl, x, kernel):
  """op(x, kernel, impl) matches op(..., ref_impl) in value and in both gradients."""
  loss = lambda i: lambda x, k: jnp.sum(jnp.sin(op(x, k, i)))
  with jax.default_matmul_precision("highest"):
    ref, got = op(x, kernel, ref_impl), op(x, kernel, impl)
    g_ref = jax.grad(loss(ref_impl), argnums=(0, 1))(x, kernel)
    g_got = jax.grad(loss(impl), argnums=(0, 1))(x, kernel)
  assert got.shape == ref.shape
  assert rel_err(got, ref) < 1e-6
  for a, b in zip(g_got, g_ref):
    assert rel_err(a, b) < 1e-5
  return got


@pytest.mark.parametrize("kernel_size", [(3, 3), (3, 7), (7, 3), (7, 7)])
@pytest.mark.parametrize("shape", [(2, 9, 9, 5), (1, 1, 1, 5)])
def test_depthwise_formulations_agree_forward_and_grad(kernel_size, shape):
  kx, kk = jax.random.split(jax.random.PRNGKey(sum(kernel_size)))
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (*kernel_size, 1, 5))
  assert_formulations_agree(ops.depthwise_conv, "shift", "xla", x, kernel)


@pytest.mark.parametrize("patch,cin,cout,groups", [(4, 3, 8, 1), (2, 6, 12, 1), (2, 6, 12, 6)])
def test_patchify_formulations_agree_forward_and_grad(patch, cin, cout, groups):
  kx, kk = jax.random.split(jax.random.PRNGKey(patch * cout + groups))
  x = jax.random.normal(kx, (2, 8, 8, cin))
  kernel = jax.random.normal(kk, (patch, patch, cin // groups, cout))
  got = assert_formulations_agree(ops.patchify_conv, "einsum", "xla", x, kernel)
  assert got.shape == (2, 8 // patch, 8 // patch, cout)


def test_resolve_impl():
  assert ops.resolve_impl("depthwise", "auto") == "shift"  # tests run on CPU
  assert ops.resolve_impl("patchify", "xla") == "xla"
  with pytest.raises(ValueError, match="depthwise_impl"):
    ops.resolve_impl("depthwise", "winograd")


def test_wrong_image_shape_gives_clear_error():
  model, variables = tiny_variables()
  shape = lambda x: jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert shape(jnp.zeros((1, 64, 96, 3))).shape == (1, 10)  # any multiple of 32
  with pytest.raises(ValueError, match=r"image size 40x32 is not a multiple of 32"):
    shape(jnp.zeros((1, 40, 32, 3)))
  with pytest.raises(ValueError, match=r"looks like NCHW: transpose it"):
    shape(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="add a batch axis"):
    shape(jnp.zeros((32, 32, 3)))
  with pytest.raises(ValueError, match="3 channels last"):
    shape(jnp.zeros((1, 32, 32, 4)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=48), "multiple of 32"),
        (dict(embed_dim=20), "multiple of 8"),
        (dict(layers=(1, 1, 1)), "4 non-negative"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_invalid_architecture_is_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    StripMLP(**{**TINY, **kwargs})


def test_initialisation_follows_pytorch_defaults():
  _, variables = tiny_variables()
  p = variables["params"]
  blk = p["blocks1_0"]
  grn = blk["channel_mixing"]["grn"]
  assert np.all(grn["gamma"] == 0) and np.all(grn["beta"] == 0)
  assert grn["gamma"].shape == (1, 1, 1, 48)
  table = np.asarray(blk["token_mixing"]["smlp_block"]["strip"]["relate_pos_h"]["embeddings_table"])
  assert table.shape == (17, 8) and 0.01 < table.std() < 0.03
  fc1 = np.asarray(blk["channel_mixing"]["fc1"]["kernel"])  # fan_in 16
  assert np.abs(fc1).max() <= 0.25 and np.abs(fc1).max() > 0.2
  proj = np.asarray(blk["token_mixing"]["smlp_block"]["strip"]["proj_h"]["kernel"])
  assert np.abs(proj).max() <= 1 / np.sqrt(3 * 8)  # fan_in 3 * L
  assert np.all(np.asarray(p["norm"]["scale"]) == 1)
  assert np.all(np.asarray(variables["batch_stats"]["norm"]["var"]) == 1)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32


def test_jit_forward_and_gradient_step_in_training_mode():
  model, variables = tiny_variables()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  y = jnp.arange(4) % 10

  @jax.jit
  def step(variables, rng):
    def loss_fn(params):
      logits, state = model.apply(
          {**variables, "params": params},
          x,
          train=True,
          rngs={"drop_path": rng},
          mutable=["batch_stats"],
      )
      onehot = jax.nn.one_hot(y, 10)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {"params": params, **state}, loss, grads

  new, loss, grads = step(variables, jax.random.PRNGKey(2))
  assert np.isfinite(loss) and loss > 0
  gnorm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads)))
  assert np.isfinite(gnorm) and gnorm > 0
  # Training updates the BatchNorm running statistics; inference uses them.
  old_mean = variables["batch_stats"]["norm"]["mean"]
  assert not np.allclose(new["batch_stats"]["norm"]["mean"], old_mean)
  eval_fn = jax.jit(lambda v: model.apply(v, x, train=False))
  assert not np.allclose(eval_fn(new), eval_fn(variables))
  # Inference is deterministic; training mode draws drop-path masks from the rng.
  np.testing.assert_array_equal(eval_fn(variables), eval_fn(variables))
  train_fn = jax.jit(
      lambda r: model.apply(
          variables, x, train=True, rngs={"drop_path": r}, mutable=["batch_stats"]
      )[0]
  )
  assert not np.allclose(train_fn(jax.random.PRNGKey(3)), train_fn(jax.random.PRNGKey(4)))


def test_drop_path_zero_rate_is_deterministic_in_training():
  model, variables = tiny_variables(drop_path_rate=0.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  out = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]  # no rng needed
  assert out.shape == (2, 10)


def test_drop_path_scales_kept_paths():
  from strip_mlp.models.strip_mlp_layers import DropPath

  x = jnp.ones((2000, 1, 1, 1))
  y = DropPath(0.25).apply({}, x, train=True, rngs={"drop_path": jax.random.PRNGKey(0)})
  kept = np.asarray(y[:, 0, 0, 0])
  np.testing.assert_allclose(np.unique(kept), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs((kept == 0).mean() - 0.25) < 0.04


def test_bfloat16_compute_is_close_to_float32():
  model32, variables = tiny_variables()
  model16 = StripMLP(**{**TINY, "dtype": "bfloat16"})
  # make GRN and BN non-trivial so that every path carries signal
  variables = jax.tree_util.tree_map(lambda a: a + 0.05, variables)
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
  out32 = jax.jit(lambda v: model32.apply(v, x))(variables)
  out16 = jax.jit(lambda v: model16.apply(v, x))(variables)
  assert out16.dtype == jnp.float32  # logits come back in float32
  assert rel_err(out16, out32) < 0.05
  assert not np.array_equal(out16, out32)
  params16 = jax.jit(lambda k: model16.init(k, x, train=False))(jax.random.PRNGKey(0))
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params16))


def test_config_dict_round_trip():
  model = create_model("tiny", dtype=jnp.bfloat16, img_size=64)
  cfg = model.config_dict()
  assert cfg["dtype"] == "bfloat16" and cfg["layers"] == [2, 2, 12, 2]
  assert StripMLP(**cfg) == StripMLP(**{**cfg, "layers": (2, 2, 12, 2)})
