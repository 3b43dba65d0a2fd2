"""PoolFormer: parity with the official code, converter accounting, sizes, backbone API."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_fixtures as ff
from strip_mlp.models.strip_mlp import count_params
from strip_mlp.convert import poolformer as pc
from strip_mlp.convert import torch_mapping as tm
from strip_mlp.models.poolformer import (
    VARIANTS,
    PoolFormer,
    PoolFormerConfigError,
    create_poolformer,
)
from strip_mlp.convert.torch_io import CheckpointFormatError

TOL = 1e-5
FIXTURES = ("poolformer_l1121_i28_c10", "poolformer_l2111_p5_nols_i36_c7")
# Printed by tests/fixtures/poolformer/make_fixtures.py: sum(p.numel()) of the official
# poolformer_s12 ... poolformer_m48 (1000 classes).
OFFICIAL_PARAMS = {
    "poolformer_s12": 11_915_176,
    "poolformer_s24": 21_388_968,
    "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520,
    "poolformer_m48": 73_473_448,
}


def fixture_model(name, **overrides):
  ref = ff.load("poolformer", name)
  arch = pc.infer_architecture(ref["sd"])
  model = PoolFormer(**arch, pool_size=ref["config"].get("pool_size", 3), **overrides)
  return ref, model, pc.state_dict_to_variables(ref["sd"], model)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_official_outputs(name):
  ref, model, variables = fixture_model(name)
  cfg = ref["config"]
  assert (
      list(model.layers),
      list(model.embed_dims),
      list(model.mlp_ratios),
      model.num_classes,
      model.use_layer_scale,
  ) == (
      cfg["layers"],
      cfg["embed_dims"],
      cfg["mlp_ratios"],
      cfg["num_classes"],
      cfg.get("use_layer_scale", True),
  )
  errors = ff.parity_errors(model, variables, ref)
  print(name, [f"{e:.1e}" for e in errors])
  assert max(errors) <= TOL, errors


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_official(variant):
  model = create_poolformer(variant)
  abstract = tm.abstract_variables(model, 32)
  assert set(abstract) == {"params"}
  assert count_params(abstract["params"]) == OFFICIAL_PARAMS[variant]
  # The converter reads the variant back from its shapes.
  sd = ff.abstract_state_dict(abstract, pc.torch_key, pc.leaf_layout)
  arch = pc.infer_architecture(sd)
  assert PoolFormer(**arch) == model


def test_backbone_shapes_and_feature_info():
  model = create_poolformer("poolformer_s12", num_classes=0)
  x = jax.ShapeDtypeStruct((2, 224, 192, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
  assert "head" not in variables["params"]
  apply = lambda method, **kw: jax.eval_shape(
      lambda v, x: model.apply(v, x, method=method, **kw), variables, x
  )
  assert apply("__call__").shape == (2, 512)
  assert apply("forward_features").shape == (2, 7, 6, 512)
  shapes = [s.shape for s in apply("stage_features")]
  assert shapes == [(2, 56, 48, 64), (2, 28, 24, 128), (2, 14, 12, 320), (2, 7, 6, 512)]
  assert [s.shape for s in apply("stage_features", out_indices=(1, 3))] == shapes[1::2]
  assert model.feature_info == tuple(
      dict(num_chs=c, reduction=r, module=f"network.{i}")
      for c, r, i in zip((64, 128, 320, 512), (4, 8, 16, 32), (0, 2, 4, 6))
  )


def test_forward_head_and_headless_conversion():
  ref, model, variables = fixture_model(FIXTURES[0])
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 16)), jnp.float32)
  pooled = model.apply(variables, feats, pre_logits=True, method="forward_head")
  np.testing.assert_array_equal(pooled, feats[:, 0, 0])
  # A state dict without the head converts to the headless model.
  sd = {k: v for k, v in ref["sd"].items() if not k.startswith("head.")}
  arch = pc.infer_architecture(sd)
  assert arch["num_classes"] == 0
  headless = pc.state_dict_to_variables(sd, PoolFormer(**arch))
  assert "head" not in headless["params"]


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module"])
def test_released_file_layouts_load(tmp_path, wrap):
  ref, model, variables = fixture_model(FIXTURES[0])
  path = tmp_path / "poolformer.pth.tar"
  ff.save_pth(path, ref["sd"], wrap)
  loaded_model, loaded = pc.torch_to_flax(str(path))
  assert loaded_model == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)


def test_overrides_of_weight_fields_are_refused(tmp_path):
  ref = ff.load("poolformer", FIXTURES[0])
  ff.save_pth(tmp_path / "w.pth", ref["sd"], "plain")
  with pytest.raises(PoolFormerConfigError, match="read from the weights"):
    pc.torch_to_flax(str(tmp_path / "w.pth"), layers=(1, 1, 1, 1))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("network.2.0.mlp.fc2.bias"), r"missing: network\.2\.0\.mlp\.fc2\.bias"),
        (
            lambda sd: sd.update({"network.0.0.extra": np.zeros(3)}),
            r"unexpected: network\.0\.0\.extra",
        ),
        (
            lambda sd: sd.update({"norm.weight": np.zeros(5, np.float32)}),
            r"shape mismatch: norm\.weight \(5,\) != \(16,\)",
        ),
    ],
)
def test_strict_accounting_one_line_errors(edit, match):
  ref, model, _ = fixture_model(FIXTURES[0])
  sd = dict(ref["sd"])
  edit(sd)
  with pytest.raises(CheckpointFormatError, match=r"does not match PoolFormer\(.*" + match) as e:
    pc.state_dict_to_variables(sd, model)
  assert "\n" not in str(e.value)


def test_round_trip_state_dict_is_identical():
  ref, _, variables = fixture_model(FIXTURES[1])
  ff.assert_same_state_dict(pc.variables_to_state_dict(variables), ref["sd"])


def test_family_detection():
  pool_sd = ff.load("poolformer", FIXTURES[0])["sd"]
  raft_sd = ff.load("raftmlp", "raftmlp_l11_i24_c5")["sd"]
  assert pc.is_poolformer_state_dict(pool_sd) and not pc.is_poolformer_state_dict(raft_sd)
  with pytest.raises(CheckpointFormatError, match="not a PoolFormer state dict"):
    pc.infer_architecture(raft_sd)


def test_bf16_compute_is_finite_and_close():
  ref, model, variables = fixture_model(FIXTURES[0], dtype="bfloat16")
  ff.assert_bf16_logits_close(model, variables, ref)


def test_training_gradients_finite_at_zero_input():
  """A constant image gives zero-variance GroupNorms: gradients must stay finite."""
  _, model, variables = fixture_model(FIXTURES[1], drop_path_rate=0.3)
  params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
  params["patch_embed"]["proj"]["bias"] = jnp.zeros_like(params["patch_embed"]["proj"]["bias"])
  rates = [b.drop_path_rate for stage in model.bind(variables).stages for b in stage]
  assert rates == pytest.approx([0.3 * i / 4 for i in range(5)])  # linear over the 5 blocks
  grads = ff.train_grads(model, params, jnp.zeros((2, 36, 36, 3)))
  assert float(jnp.abs(grads["head"]["bias"]).sum()) > 0


def test_config_dict_rebuilds_and_errors_say_what_to_do():
  model = create_poolformer("poolformer_s24", num_classes=10, dtype=jnp.bfloat16)
  cfg = json.loads(json.dumps(model.config_dict()))
  assert PoolFormer(**cfg).config_dict() == model.config_dict() and cfg["dtype"] == "bfloat16"
  with pytest.raises(PoolFormerConfigError, match="pool_size must be odd"):
    PoolFormer(pool_size=4)
  with pytest.raises(PoolFormerConfigError, match="unknown PoolFormer variant"):
    create_poolformer("poolformer_s13")
  with pytest.raises(PoolFormerConfigError, match="looks like NCHW"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 64, 64))))
