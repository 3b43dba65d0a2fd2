"""build(config, info, mesh) (strip_mlp/train/build.py): the model a config names, of any family,
with its abstract train state (nothing compiled)."""

import jax
import pytest

import train_test_utils
from strip_mlp.models import registry
from strip_mlp.runtime import sharding
from strip_mlp.train.build import build
from strip_mlp.errors import ConfigError
from strip_mlp.models.strip_mlp import StripMLP, abstract_variables, count_params
from strip_mlp.train.plan import validate_config


@pytest.mark.parametrize(
    "name, cls",
    [
        ("poolformer_s12", "PoolFormer"),
        ("raftmlp_s", "RaftMLP"),
        ("msmlp_t", "MSMLP"),
        ("", "StripMLP"),
    ],
)
def test_model_name_builds_any_family(name, cls):
  config = train_test_utils.small_config(
      **{"model.name": name, "data.image_size": 64, "model.drop_path_rate": 0.05}
  )
  validate_config(config, check_devices=False)
  run = build(config, train_test_utils.dataset_info(7), sharding.create_mesh(1, jax.devices()[:1]))
  assert type(run.model).__name__ == cls and run.model.num_classes == 7
  assert run.model.drop_path_rate == 0.05
  if name:  # the variant's architecture with this data's classes and size
    sized = {"img_size": 64} if hasattr(run.model, "img_size") else {}
    want = registry.create(name, num_classes=7, drop_path_rate=0.05, **sized)
    assert want == run.model
    assert count_params(run.abstract_state.params) == count_params(
        abstract_variables(want)["params"]
    )
  else:
    assert isinstance(run.model, StripMLP) and run.model.img_size == 64
  assert registry.model_from_config(registry.model_config(run.model)) == run.model


def test_unknown_model_name_is_a_config_error():
  config = train_test_utils.small_config(**{"model.name": "poolformer_xl"})
  with pytest.raises(ConfigError, match="model.name='poolformer_xl' must be one of"):
    validate_config(config, check_devices=False)
