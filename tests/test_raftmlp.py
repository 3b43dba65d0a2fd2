"""RaftMLP: parity with the official code, converter accounting, sizes, backbone API."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_fixtures as ff
from strip_mlp.models.strip_mlp import count_params
from strip_mlp.convert import raftmlp as rc
from strip_mlp.convert import torch_mapping as tm
from strip_mlp.models.raftmlp import VARIANTS, RaftMLP, RaftMLPConfigError, create_raftmlp
from strip_mlp.convert.torch_io import CheckpointFormatError

TOL = 1e-5
FIXTURES = ("raftmlp_l1121_i32_c10", "raftmlp_l11_i24_c5")
# Printed by tests/fixtures/raftmlp/make_fixtures.py: sum(p.numel()) of the official RaftMLP
# built from the official ImageNet settings of RaftMLP-S/M/L (1000 classes).
OFFICIAL_PARAMS = {"raftmlp_s": 9_868_768, "raftmlp_m": 21_413_632, "raftmlp_l": 36_184_672}


def fixture_model(name, **overrides):
  ref = ff.load("raftmlp", name)
  model = RaftMLP(**rc.infer_architecture(ref["sd"]), **overrides)
  return ref, model, rc.state_dict_to_variables(ref["sd"], model)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_official_outputs(name):
  ref, model, variables = fixture_model(name)
  cfg = ref["config"]
  levels = cfg["layers"]
  assert model.config_dict() | dict(drop_path_rate=0.0, dtype="float32") == dict(
      dims=[l["dim"] for l in levels],
      depths=[l["depth"] for l in levels],
      raft_sizes=[l["raft_size"] for l in levels],
      embedding_kernels=[l["embedding_kernels"] for l in levels],
      img_size=cfg["pretrained_image_size"],
      num_classes=cfg["num_classes"],
      token_expansion_factor=cfg.get("token_expansion_factor", 2),
      channel_expansion_factor=cfg.get("channel_expansion_factor", 4),
      drop_path_rate=0.0,
      dtype="float32",
  )
  errors = ff.parity_errors(model, variables, ref)
  print(name, [f"{e:.1e}" for e in errors])
  assert max(errors) <= TOL, errors


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_official(variant):
  model = create_raftmlp(variant)
  abstract = tm.abstract_variables(model, 224)
  assert set(abstract) == {"params"}
  assert count_params(abstract["params"]) == OFFICIAL_PARAMS[variant]
  # The converter reads the variant back from its shapes (224 px among those that fit).
  sd = ff.abstract_state_dict(abstract, rc.torch_key, rc.leaf_layout)
  assert RaftMLP(**rc.infer_architecture(sd)) == model


def test_shapes_that_fit_several_sizes_need_img_size():
  model = RaftMLP(
      dims=(8,), depths=(1,), raft_sizes=(2,), embedding_kernels=((4,),), img_size=32, num_classes=3
  )
  sd = ff.abstract_state_dict(tm.abstract_variables(model, 32), rc.torch_key, rc.leaf_layout)
  with pytest.raises(
      CheckpointFormatError, match=r"fits image sizes \[8, 16, 32, 64\].*" "pass img_size="
  ) as e:
    rc.infer_architecture(sd)
  assert "\n" not in str(e.value)
  assert RaftMLP(**rc.infer_architecture(sd, img_size=32)) == model


def test_backbone_shapes_and_feature_info():
  model = create_raftmlp("raftmlp_m", num_classes=0)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = tm.abstract_variables(model, 224)
  assert "classifier" not in variables["params"]
  apply = lambda method, **kw: jax.eval_shape(
      lambda v, x: model.apply(v, x, method=method, **kw), variables, x
  )
  assert apply("__call__").shape == (2, 768)
  assert apply("forward_features").shape == (2, 7, 7, 768)
  shapes = [s.shape for s in apply("stage_features")]
  assert shapes == [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384), (2, 7, 7, 768)]
  assert [s.shape for s in apply("stage_features", out_indices=(0, 2))] == shapes[::2]
  assert model.feature_info == tuple(
      dict(num_chs=c, reduction=r, module=f"levels.{i}")
      for i, (c, r) in enumerate(zip((96, 192, 384, 768), (4, 8, 16, 32)))
  )


def test_forward_head_and_headless_conversion():
  ref, model, variables = fixture_model(FIXTURES[1])
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 10)), jnp.float32)
  pooled = model.apply(variables, feats, pre_logits=True, method="forward_head")
  np.testing.assert_allclose(pooled, feats.mean(axis=(1, 2)), rtol=1e-6)
  sd = {k: v for k, v in ref["sd"].items() if not k.startswith("classifier.")}
  arch = rc.infer_architecture(sd)
  assert arch["num_classes"] == 0
  assert "classifier" not in rc.state_dict_to_variables(sd, RaftMLP(**arch))["params"]


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module"])
def test_released_file_layouts_load(tmp_path, wrap):
  ref, model, variables = fixture_model(FIXTURES[0])
  path = tmp_path / "last_model_0.pt"
  ff.save_pth(path, ref["sd"], wrap)
  loaded_model, loaded = rc.torch_to_flax(str(path))
  assert loaded_model == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
  with pytest.raises(RaftMLPConfigError, match="read from the weights"):
    rc.torch_to_flax(str(path), raft_sizes=(1, 1, 1, 1))


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: sd.pop("levels.1.fn.2.3.norm.1.bias"),
            r"missing: levels\.1\.fn\.2\.3\.norm\.1",
        ),
        (
            lambda sd: sd.update({"heads.1.1.weight": np.zeros(3)}),
            r"unexpected: heads\.1\.1\.weight",
        ),
        (
            lambda sd: sd.update({"levels.0.fn.2.5.fn.0.weight": np.zeros((8, 8), np.float32)}),
            r"shape mismatch: levels\.0\.fn\.2\.5\.fn\.0\.weight \(8, 8\) != \(32, 8\)",
        ),
    ],
)
def test_strict_accounting_one_line_errors(edit, match):
  ref, model, _ = fixture_model(FIXTURES[0])
  sd = dict(ref["sd"])
  edit(sd)
  with pytest.raises(CheckpointFormatError, match=r"does not match RaftMLP\(.*" + match) as e:
    rc.state_dict_to_variables(sd, model)
  assert "\n" not in str(e.value)


def test_round_trip_state_dict_is_identical():
  ref, _, variables = fixture_model(FIXTURES[0])
  ff.assert_same_state_dict(rc.variables_to_state_dict(variables), ref["sd"])


def test_family_detection():
  raft_sd = ff.load("raftmlp", FIXTURES[1])["sd"]
  pool_sd = ff.load("poolformer", "poolformer_l1121_i28_c10")["sd"]
  assert rc.is_raftmlp_state_dict(raft_sd) and not rc.is_raftmlp_state_dict(pool_sd)
  with pytest.raises(CheckpointFormatError, match="not a RaftMLP state dict"):
    rc.infer_architecture(pool_sd)


def test_bf16_compute_is_finite_and_close():
  ref, model, variables = fixture_model(FIXTURES[1], dtype="bfloat16")
  ff.assert_bf16_logits_close(model, variables, ref)


def test_training_gradients_finite_at_zero_input():
  """A zero image and zero embedding bias give zero-variance LayerNorms: gradients stay finite."""
  _, model, variables = fixture_model(FIXTURES[1], drop_path_rate=0.3)
  params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
  fc = params["levels_0"]["embedding"]["fc"]
  fc["bias"] = jnp.zeros_like(fc["bias"])
  grads = ff.train_grads(model, params, jnp.zeros((2, 24, 24, 3)))
  assert float(jnp.abs(grads["classifier"]["bias"]).sum()) > 0


def test_config_dict_rebuilds_and_errors_say_what_to_do():
  model = create_raftmlp("raftmlp_l", num_classes=10, img_size=256, dtype=jnp.bfloat16)
  cfg = json.loads(json.dumps(model.config_dict()))
  assert RaftMLP(**cfg).config_dict() == model.config_dict() and cfg["dtype"] == "bfloat16"
  with pytest.raises(RaftMLPConfigError, match="use a positive multiple of 32"):
    create_raftmlp("raftmlp_s", img_size=240)
  with pytest.raises(RaftMLPConfigError, match="raft_size 3 must divide dims 64"):
    create_raftmlp("raftmlp_s", raft_sizes=(3, 2, 2, 2))
  with pytest.raises(RaftMLPConfigError, match="k - p even"):
    create_raftmlp("raftmlp_s", embedding_kernels=((4, 6), (2,), (2,), (2,)))
  with pytest.raises(RaftMLPConfigError, match="img_size=192"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 192, 192, 3))))
  with pytest.raises(RaftMLPConfigError, match="looks like NCHW"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 256, 256))))
