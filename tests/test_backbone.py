"""Strip-MLP as a backbone: any input size (windowed strip layers), headless and multi-scale
feature outputs, converted weights without head, rematerialised blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from conftest import FIXTURE_NAMES
from strip_mlp import StripMLP, VARIANTS, count_params, create_model
from strip_mlp.models import windows
from strip_mlp.convert import state_dict_to_variables, torch_to_flax, variables_to_state_dict
from strip_mlp.models.strip_mlp_layers import StripMixing
from strip_mlp.models.strip_mlp import ModelInputError, abstract_variables
from strip_mlp.convert.torch_io import read_state_dict

SMALL = FIXTURE_NAMES[0]  # embed 40, layers 1,1,2,1, 32 px: strip lengths 8, 4, 2, 1
# One block in stage 1 and stage 4: both ends of the strip lengths, at a small compile.
TINY = dict(embed_dim=16, layers=(1, 0, 0, 1), img_size=64, num_classes=10, drop_path_rate=0.1)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# --------------------------------------------------------------------- window placement
def test_window_plans_follow_mlp_dino():
  # 10 tokens, L = 7: 2 windows, overlap round(4 - 0.5) = 4 (half to even).
  assert windows.axis_plan(10, 7).starts == (0, 3)
  # 21 = 3 L: round(3.5) = 4 windows, overlap 2, the last moved back to end at 21.
  assert windows.axis_plan(21, 7).starts == (0, 5, 10, 14)
  # 14 = 2 L: round(2.5) = 2 windows side by side; shorter than L: one padded window.
  assert windows.axis_plan(14, 7).starts == (0, 7)
  plan = windows.axis_plan(3, 7)
  assert (plan.padded, plan.starts) == (7, (0,))
  assert windows.axis_plan(7, 7).identity and not windows.axis_plan(8, 7).identity
  # Merge weights: 1 where one window covers, 0.5 / 0.5 in overlaps; rows sum to 1.
  plan = windows.axis_plan(21, 7)
  np.testing.assert_array_equal(plan.merge_weight.sum(1), 1.0)
  assert plan.merge_weight[5].tolist() == [0.5, 0.5] and plan.merge_weight[4, 0] == 1.0
  assert plan.merge_weight[14].tolist() == [0.5, 0.5]  # window 2 ends at 17, 3 starts 14


def _dino_windows(size, length):
  """Window starts, overlap and last overlap, from the MLP-DINO description."""
  padded = max(size, length)
  if padded == length:
    return [0], 0, 0
  count = round(padded / length + 0.5)
  olp = round((count * length - padded) / (count - 1) - 0.5)
  starts, last = [0], 0
  for i in range(1, count):
    start = i * length - i * olp
    if start + length > padded:
      start = padded - length
      last = starts[-1] + length - start
    starts.append(start)
  return starts, olp, last


def _dino_merge(parts, olp, last, axis):
  """Concatenates window outputs, averaging each overlap 0.5 / 0.5 with what came before."""
  out = parts[0]
  for j, data in enumerate(parts[1:], start=1):
    o = last if (j == len(parts) - 1 and last) else olp
    if o == 0:
      out = jnp.concatenate([out, data], axis)
      continue
    n = out.shape[axis]
    out = jnp.concatenate(
        [
            lax.slice_in_dim(out, 0, n - o, axis=axis),
            lax.slice_in_dim(out, n - o, n, axis=axis) * 0.5
            + lax.slice_in_dim(data, 0, o, axis=axis) * 0.5,
            lax.slice_in_dim(data, o, data.shape[axis], axis=axis),
        ],
        axis,
    )
  return out


def _reference_windowed(layer, x, length):
  """layer (on L x L maps) applied window by window, merged rows first, then cropped."""
  _, h, w, _ = x.shape
  (sh, oh, lh), (sw, ow, lw) = _dino_windows(h, length), _dino_windows(w, length)
  xp = jnp.pad(x, ((0, 0), (0, max(h, length) - h), (0, max(w, length) - w), (0, 0)))
  rows = [
      _dino_merge([layer(xp[:, i : i + length, j : j + length]) for j in sw], ow, lw, 2) for i in sh
  ]
  return _dino_merge(rows, oh, lh, 1)[:, :h, :w]


@functools.lru_cache(maxsize=None)
def _strip_layer():
  layer = StripMixing(channels=16, resolution=7)
  variables = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 8)), train=False)
  # Non-trivial BatchNorm statistics so that every path carries signal.
  variables = jax.tree_util.tree_map(lambda a: a + 0.1, variables)
  return layer, variables


# (10, 21): uneven overlap / last window moved to the edge; (3, 5): padded both ways;
# (14, 9): windows side by side x overlap 5; (7, 7): the trained size.
@pytest.mark.parametrize("size", [(10, 21), (3, 5), (14, 9), (7, 7)], ids=str)
def test_windowed_strip_layer_matches_window_loop_reference(size):
  layer, variables = _strip_layer()
  x = jax.random.normal(jax.random.PRNGKey(sum(size)), (2, *size, 8))
  apply = lambda v, x: layer.apply(v, x, train=False)
  ref_apply = lambda v, x: _reference_windowed(lambda u: layer.apply(v, u, train=False), x, 7)
  loss = lambda f: lambda v, x: jnp.sum(jnp.sin(f(v, x)))
  with jax.default_matmul_precision("highest"):
    got = jax.jit(apply)(variables, x)
    ref = ref_apply(variables, x)
    g_got = jax.jit(jax.grad(loss(apply), argnums=(0, 1)))(variables, x)
    g_ref = jax.grad(loss(ref_apply), argnums=(0, 1))(variables, x)
  assert got.shape == x.shape
  assert rel_err(got, ref) < 1e-6
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(g_got), jax.tree_util.tree_leaves(g_ref)
  ):
    assert np.all(np.isfinite(a)), path
    assert rel_err(a, b) < 1e-5, path


def test_trained_size_strip_layer_has_no_windowing():
  layer, variables = _strip_layer()
  gathers = lambda shape: str(
      jax.make_jaxpr(lambda v, x: layer.apply(v, x, train=False))(variables, jnp.zeros(shape))
  ).count(" gather[")
  assert gathers((1, 7, 7, 8)) == 2  # the two position tables, nothing else
  assert gathers((1, 7, 9, 8)) > 2


# --------------------------------------------------------------------- whole model
@functools.lru_cache(maxsize=None)
def _tiny(**overrides):
  model = StripMLP(**{**TINY, **overrides})
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False))
  variables = jax.tree_util.tree_map(lambda a: a + 0.05, init(jax.random.PRNGKey(0)))
  return model, variables


@pytest.mark.parametrize("size", [(32, 32), (64, 96)], ids=str)
def test_model_runs_smaller_and_non_square_with_finite_gradients(size):
  model, variables = _tiny()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *size, 3))

  def loss(params, x):
    logits, _ = model.apply(
        {**variables, "params": params},
        x,
        train=True,
        rngs={"drop_path": jax.random.PRNGKey(2)},
        mutable=["batch_stats"],
    )
    return jnp.sum(jnp.sin(logits))

  value, (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)
  assert np.isfinite(value) and np.all(np.isfinite(g_x)) and np.abs(g_x).max() > 0
  leaves = jax.tree_util.tree_leaves(g_params)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # Every strip layer, windowed (64x96) or padded (32x32), gets a gradient.
  flat = traverse_util.flatten_dict(g_params)
  strip = [v for k, v in flat.items() if k[-2] in ("proj_h", "proj_w")]
  assert len(strip) == 8 and all(np.abs(v).max() > 0 for v in strip)


def test_sizes_not_multiple_of_32_get_one_line_error():
  model, variables = _tiny()
  with pytest.raises(ModelInputError, match=r"48x64 is not a multiple of 32.*64x64"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 48, 64, 3))), variables)
  with pytest.raises(ModelInputError, match="looks like NCHW"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 3, 64, 64))), variables)
  with pytest.raises(ModelInputError, match="out_indices"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)), method="stage_features", out_indices=(4,))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_backbone_shapes_of_every_variant(variant):
  model = create_model(variant)
  headless = create_model(variant, num_classes=0)
  e = VARIANTS[variant]["embed_dim"]
  full, bare = abstract_variables(model), abstract_variables(headless)
  assert "head" not in bare["params"]
  assert count_params(full["params"]) - count_params(bare["params"]) == 1000 * (8 * e + 1)
  x = jax.ShapeDtypeStruct((2, 256, 320, 3), jnp.float32)  # detection-style, non-square
  logits, final, feats = jax.eval_shape(
      lambda v, x: (
          model.apply(v, x),
          model.apply(v, x, method="forward_features"),
          model.apply(v, x, method="stage_features"),
      ),
      full,
      x,
  )
  pooled, picked = jax.eval_shape(
      lambda v, x: (
          headless.apply(v, x),
          headless.apply(v, x, method="stage_features", out_indices=(1, 3)),
      ),
      bare,
      x,
  )
  assert (logits.shape, pooled.shape, final.shape) == ((2, 1000), (2, 8 * e), (2, 8, 10, 8 * e))
  info = model.feature_info
  assert [f["num_chs"] for f in info] == [e, 2 * e, 4 * e, 8 * e]
  assert [f["reduction"] for f in info] == [4, 8, 16, 32]
  assert [f.shape for f in feats] == [
      (2, 256 // f["reduction"], 320 // f["reduction"], f["num_chs"]) for f in info
  ]
  assert [f.shape[-1] for f in picked] == [2 * e, 8 * e]


def test_entry_points_compose_to_call_exactly(fixtures_dir):
  ref = np.load(fixtures_dir / f"{SMALL}.npz")
  model, variables = torch_to_flax(str(fixtures_dir / f"{SMALL}.pth"))
  x = ref["input_nchw"].transpose(0, 2, 3, 1)

  def everything(v, x):
    logits = model.apply(v, x)
    feats = model.apply(v, x, method="forward_features")
    return (
        logits,
        model.apply(v, feats, method="forward_head"),
        model.apply(v, feats, pre_logits=True, method="forward_head"),
        model.apply(v, x, method="stage_features"),
        model.apply(v, x, method="stage_features", out_indices=(2,)),
    )

  with jax.default_matmul_precision("highest"):
    logits, head, pooled, stages, (stage3,) = jax.jit(everything)(variables, x)
  np.testing.assert_array_equal(head, logits)
  assert rel_err(logits, ref["logits"]) < 1e-5 and rel_err(pooled, ref["pooled"]) < 1e-5
  for s, a in enumerate(stages, start=1):
    assert rel_err(a, ref[f"stage{s}"].transpose(0, 2, 3, 1)) < 1e-5
  np.testing.assert_array_equal(stage3, stages[2])


def test_headless_fixture_from_state_dict_without_head_runs_at_twice_its_size(fixtures_dir):
  ref = np.load(fixtures_dir / f"{SMALL}.npz")
  sd = read_state_dict(str(fixtures_dir / f"{SMALL}.pth"))
  model = StripMLP(embed_dim=40, layers=(1, 1, 2, 1), img_size=32, num_classes=0)
  bare = {k: v for k, v in sd.items() if not k.startswith("head.")}
  variables = state_dict_to_variables(bare, model)
  assert "head" not in variables["params"]
  assert {
      k for k in variables_to_state_dict(variables) if not k.endswith("num_batches_tracked")
  } == set(bare)
  dropped = torch_to_flax(str(fixtures_dir / f"{SMALL}.pth"), num_classes=0)
  assert dropped[0] == model
  x = ref["input_nchw"].transpose(0, 2, 3, 1)
  big = np.asarray(jax.image.resize(x, (x.shape[0], 64, 64, 3), "linear"))
  with jax.default_matmul_precision("highest"):
    pooled = jax.jit(model.apply)(variables, x)
    feats = jax.jit(lambda v, x: model.apply(v, x, method="stage_features"))(variables, big)
  assert rel_err(pooled, ref["pooled"]) < 1e-5
  assert [f.shape for f in feats] == [
      (x.shape[0], 16, 16, 40),
      (x.shape[0], 8, 8, 80),
      (x.shape[0], 4, 4, 160),
      (x.shape[0], 2, 2, 320),
  ]
  assert all(np.all(np.isfinite(f)) and np.abs(f).max() > 0 for f in feats)


def test_remat_gives_the_same_gradients():
  model, variables = _tiny()
  remat, _ = _tiny(remat=True)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 64, 3))

  def grads(m):
    def loss(params):
      logits, _ = m.apply(
          {**variables, "params": params},
          x,
          train=True,
          rngs={"drop_path": jax.random.PRNGKey(4)},
          mutable=["batch_stats"],
      )
      return jnp.sum(jnp.sin(logits))

    with jax.default_matmul_precision("highest"):
      return jax.jit(jax.grad(loss))(variables["params"])

  plain, again = grads(model), grads(remat)
  # Per leaf against the whole gradient's norm: some leaves' true gradients are ~0 (a
  # bias ahead of training-mode BatchNorm), their own relative error is rounding noise.
  scale = np.linalg.norm(np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(plain)]))
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(plain), jax.tree_util.tree_leaves(again)
  ):
    assert np.abs(a).max() > 0, path
    assert np.linalg.norm(np.asarray(b, np.float64) - a) <= 1e-6 * scale, path
