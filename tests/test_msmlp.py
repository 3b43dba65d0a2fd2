"""MS-MLP: parity with the official PyTorch outputs, strict conversion, counts and shapes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import REPO
from strip_mlp.models.strip_mlp import count_params
from strip_mlp.convert import msmlp as convert
from strip_mlp.models.msmlp import VARIANTS, ArchitectureError, MSMLP, chunk_sizes, create_msmlp
from strip_mlp.convert.torch_io import CheckpointFormatError

FIXTURES = REPO / "tests" / "fixtures" / "msmlp"
RELEASED, GROUPS3 = "msmlp_e9_i32_d1211_c10", "msmlp_e5_i64_d1111_c7_g3"
TOL = 1e-5
# Counted with torch from the official MS_MLP built with the released configs
# (tests/fixtures/msmlp/make_fixtures.py prints them): (1000 classes, headless).
OFFICIAL_PARAM_COUNTS = {
    "msmlp_t": (28_656_232, 27_887_232),
    "msmlp_s": (50_303_752, 49_534_752),
    "msmlp_b": (88_696_792, 87_671_792),
}
FAST = dict(depthwise_impl="xla", patchify_impl="xla")  # quickest to trace and compile


def load_fixture(name):
  """(state dict {key: float32 array}, constructor keywords, reference arrays)."""
  z = np.load(FIXTURES / f"{name}.npz")
  prefix = "state_dict/"
  sd = {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}
  return sd, json.loads(str(z["config"])), {k: z[k] for k in z.files if "/" not in k}


def fixture_model(name, **overrides):
  sd, cfg, ref = load_fixture(name)
  model = MSMLP(**convert.infer_architecture(sd), img_size=cfg["img_size"], **overrides)
  return model, convert.state_dict_to_variables(sd, model), sd, ref


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def features_and_heads(module, x):
  feats = module.stage_features(x)
  return feats, module.forward_head(feats[-1]), module.forward_head(feats[-1], True)


# Each fixture under one formulation of the depthwise/patchify ops (both are covered).
@pytest.mark.parametrize(
    "name,impls",
    [(RELEASED, FAST), (GROUPS3, dict(depthwise_impl="shift", patchify_impl="einsum"))],
)
def test_parity_with_official_outputs(name, impls):
  model, variables, _, ref = fixture_model(name, **impls)
  x = ref["input_nchw"].transpose(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    feats, logits, pre_logits = jax.jit(lambda v, x: model.apply(v, x, method=features_and_heads))(
        variables, x
    )
  errors = {
      "logits": rel_err(logits, ref["logits"]),
      "pre_logits": rel_err(pre_logits, ref["pre_logits"]),
  }
  for s, f in enumerate(feats):
    errors[f"stage{s + 1}"] = rel_err(f, ref[f"stage{s + 1}"].transpose(0, 2, 3, 1))
  print(name, {k: f"{v:.1e}" for k, v in errors.items()})
  assert all(e <= TOL for e in errors.values()), errors


def test_inferred_architecture_is_the_fixture_config():
  for name in (RELEASED, GROUPS3):
    sd, cfg, _ = load_fixture(name)
    arch = convert.infer_architecture(sd)
    assert convert.is_msmlp_state_dict(sd)
    for key in (
        "embed_dim",
        "depths",
        "num_classes",
        "shift_dist",
        "mix_size",
        "mlp_ratio",
        "patch_norm",
    ):
      assert arch[key] == cfg[key], key


def test_headless_model_gives_the_official_pre_logits():
  sd, cfg, ref = load_fixture(GROUPS3)
  sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
  arch = convert.infer_architecture(sd)
  assert arch["num_classes"] == 0
  model = MSMLP(**arch, img_size=cfg["img_size"], **FAST)
  variables = convert.state_dict_to_variables(sd, model)
  assert "head" not in variables["params"]
  with jax.default_matmul_precision("highest"):
    out = jax.jit(model.apply)(variables, ref["input_nchw"].transpose(0, 2, 3, 1))
  assert rel_err(out, ref["pre_logits"]) <= TOL


def one_line_error(sd, model):
  with pytest.raises(CheckpointFormatError) as e:
    convert.state_dict_to_variables(sd, model)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_conversion_is_strict():
  model, _, sd, _ = fixture_model(GROUPS3, **FAST)
  key = "layers.1.blocks.0.dwconv_td.2.weight"
  msg = one_line_error({k: v for k, v in sd.items() if k != key}, model)
  assert f"missing: {key}" in msg and "unexpected" not in msg
  msg = one_line_error({**sd, "layers.1.blocks.0.extra": sd[key]}, model)
  assert "unexpected: layers.1.blocks.0.extra" in msg and "missing" not in msg
  msg = one_line_error({**sd, key: sd[key][:, :, :1]}, model)
  assert f"shape mismatch: {key} (2, 1, 1, 5) != (2, 1, 5, 5)" in msg
  both = {k: v for k, v in sd.items() if k != "norm.bias"} | {"head.extra": sd["head.bias"]}
  msg = one_line_error(both, model)
  assert "missing: norm.bias; unexpected: head.extra" in msg and msg.startswith(
      "state dict does not match MSMLP(embed_dim=5, depths=[1, 1, 1, 1]"
  )


def test_round_trip_state_dict_variables_state_dict():
  model, variables, sd, _ = fixture_model(RELEASED, **FAST)
  back = convert.variables_to_state_dict(variables)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  again = convert.state_dict_to_variables(back, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


def test_checkpoint_without_layer_scale_converts_to_a_model_without_gamma():
  sd, cfg, _ = load_fixture(GROUPS3)
  sd = {k: v for k, v in sd.items() if not k.endswith(".gamma")}
  arch = convert.infer_architecture(sd)
  assert arch["layer_scale_init_value"] == 0.0
  model = MSMLP(**arch, img_size=cfg["img_size"], **FAST)
  assert convert.variables_to_state_dict(convert.state_dict_to_variables(sd, model)).keys() == (
      sd.keys()
  )


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict"])
def test_torch_to_flax_reads_each_checkpoint_format(tmp_path, layout):
  sd, cfg, _ = load_fixture(GROUPS3)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  obj = tensors if layout == "bare" else {layout: tensors, "epoch": 299}
  torch.save(obj, tmp_path / "w.pth")
  model, variables = convert.torch_to_flax(str(tmp_path / "w.pth"), img_size=cfg["img_size"])
  assert (model.embed_dim, model.depths, model.mlp_ratio) == (5, (1, 1, 1, 1), 3.0)
  assert convert.variables_to_state_dict(variables).keys() == sd.keys()
  with pytest.raises(CheckpointFormatError, match="cannot be overridden"):
    convert.torch_to_flax(str(tmp_path / "w.pth"), embed_dim=8)


def test_other_state_dicts_are_not_msmlp():
  strip_like = {"patch_embed.weight": np.zeros((8, 3, 4, 4)), "head.weight": np.zeros((2, 8))}
  assert not convert.is_msmlp_state_dict(strip_like)
  with pytest.raises(CheckpointFormatError, match="not an MS-MLP state dict"):
    convert.infer_architecture(strip_like)


def abstract_params(model, size=32):
  x = jax.ShapeDtypeStruct((1, size, size, model.in_chans), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_counts_equal_the_official_ones(variant):
  for classes, want in zip((1000, 0), OFFICIAL_PARAM_COUNTS[variant]):
    model = create_msmlp(variant, num_classes=classes, img_size=32, **FAST)
    params = abstract_params(model)
    assert count_params(params) == want
    assert ("head" in params) == (classes > 0)


def test_backbone_shapes_of_the_tiny_variant_at_a_non_square_size():
  model = create_msmlp("msmlp_t", num_classes=0, **FAST)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  x = jax.ShapeDtypeStruct((2, 256, 320, 3), jnp.float32)
  run = lambda method, **kw: jax.eval_shape(
      lambda v, x: model.apply(v, x, method=method, **kw), variables, x
  )
  feats = run("stage_features")
  assert [f.shape for f in feats] == [
      (2, 64, 80, 96),
      (2, 32, 40, 192),
      (2, 16, 20, 384),
      (2, 8, 10, 768),
  ]
  assert [f.shape for f in run("stage_features", out_indices=(3, 1))] == [
      (2, 8, 10, 768),
      (2, 32, 40, 192),
  ]
  assert run("forward_features").shape == (2, 8, 10, 768)
  assert run("__call__").shape == (2, 768)
  assert [(i["num_chs"], i["reduction"], i["module"]) for i in model.feature_info] == [
      (96, 4, "layers_0"),
      (192, 8, "layers_1"),
      (384, 16, "layers_2"),
      (768, 32, "layers_3"),
  ]
  with pytest.raises(ArchitectureError, match="out_indices"):
    run("stage_features", out_indices=(4,))


def test_bfloat16_compute_is_finite_and_close_to_float32():
  model, variables, _, ref = fixture_model(GROUPS3, **FAST)
  bf16 = MSMLP(**{**model.config_dict(), "dtype": "bfloat16"})
  x = ref["input_nchw"].transpose(0, 2, 3, 1)
  logits = jax.jit(bf16.apply)(variables, x)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert rel_err(logits, ref["logits"]) < 0.05


def test_training_gradients_are_finite_with_drop_path_and_dropout():
  model = MSMLP(
      embed_dim=5,
      depths=(2, 0, 0, 0),
      img_size=32,
      num_classes=3,
      shift_dist=(-1, 0, 1),
      mix_size=((1, 3, 3),) * 4,
      drop_path_rate=0.5,
      drop_rate=0.1,
      **FAST,
  )
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = jax.tree_util.tree_map(  # numpy values: no per-op compiles of an eager init
      lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), abstract_params(model)
  )
  loss = lambda p, key: jnp.sum(
      model.apply({"params": p}, x, train=True, rngs={"drop_path": key}) ** 2
  )
  grads = jax.jit(jax.grad(loss))(params, jax.random.PRNGKey(2))
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(bool(jnp.any(g != 0)) for g in leaves)


def test_config_dict_rebuilds_the_model_and_is_json():
  model = create_msmlp("msmlp_s", num_classes=3)
  config = json.loads(json.dumps(model.config_dict()))
  assert MSMLP(**config).config_dict() == model.config_dict()
  assert config["mix_size"][3] == [1, 7, 7, 7, 7] and config["drop_path_rate"] == 0.4


def test_torch_chunk_split_and_sizes_it_cannot_split():
  assert chunk_sizes(96, 5) == (20, 20, 20, 20, 16)
  assert chunk_sizes(9, 5) == (2, 2, 2, 2, 1)
  assert chunk_sizes(16, 5) == (4, 4, 4, 4)  # fewer groups: the official code fails too
  with pytest.raises(ArchitectureError, match="torch.chunk splits into 4 groups, not 5"):
    MSMLP(embed_dim=16)
  with pytest.raises(ArchitectureError, match="mix_size"):
    MSMLP(shift_dist=(-1, 0, 1))
  with pytest.raises(ArchitectureError, match="unknown MS-MLP variant"):
    create_msmlp("msmlp_l")


def test_input_errors_say_what_to_do():
  model = MSMLP(embed_dim=5, depths=(1, 1, 1, 1), img_size=32, **FAST)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  for shape, advice in [
      ((1, 3, 32, 32), "looks like NCHW"),
      ((1, 48, 32, 3), "multiples of 32"),
      ((32, 32, 3), "add a batch axis"),
  ]:
    with pytest.raises(ArchitectureError, match=advice):
      jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
