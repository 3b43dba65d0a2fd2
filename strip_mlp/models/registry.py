"""Every model family by name, for configs, checkpoints and PyTorch files.

    registry.create("poolformer_s12", num_classes=10)      # a variant of any family
    registry.model_config(model)                            # JSON-able, with its family
    registry.model_from_config(config)                      # and back
    registry.torch_to_flax("poolformer_s12.pth")            # family detected from the keys

Strip-MLP's configs carry no "family" key (checkpoints written before the relatives
existed read as Strip-MLP); every other family's does.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from strip_mlp.errors import CheckpointFormatError, ConfigError

STRIP_MLP = "strip_mlp"


@dataclasses.dataclass(frozen=True)
class Family:
  """Where a family lives: its model class and creator, and its converter module
  (infer_architecture, state_dict_to_variables, variables_to_state_dict and, except for
  Strip-MLP, is_<family>_state_dict); its name for people (title) and the constructor
  keywords that one line about a model shows (summary_keys, all in its config_dict)."""

  name: str
  model_module: str
  class_name: str
  create_name: str
  convert_module: str
  title: str
  summary_keys: tuple[str, ...]

  def module(self):
    return importlib.import_module(self.model_module)

  def model_class(self):
    return getattr(self.module(), self.class_name)

  def converter(self):
    return importlib.import_module(self.convert_module)

  def has_img_size(self) -> bool:
    """Whether the family's models are built for an `img_size` (a constructor field);
    the others (PoolFormer, MS-MLP) have the same parameters at every input size."""
    return "img_size" in self.model_class().__dataclass_fields__

  def variants(self) -> dict:
    return self.module().VARIANTS

  def create(self, variant: str, **overrides):
    return getattr(self.module(), self.create_name)(variant, **overrides)

  def describe(self, model) -> str:
    """One line about `model` (of this family): its title and summary keywords, e.g.
    'MS-MLP embed_dim=96 depths=[3, 3, 9, 3] num_classes=1000'."""
    config = model.config_dict()
    return " ".join([self.title] + [f"{k}={config[k]}" for k in self.summary_keys])


FAMILIES = {
    f.name: f
    for f in (
        Family(
            STRIP_MLP,
            "strip_mlp.models.strip_mlp",
            "StripMLP",
            "create_model",
            "strip_mlp.convert.strip_mlp",
            title="Strip-MLP",
            summary_keys=("embed_dim", "layers", "img_size", "num_classes"),
        ),
        Family(
            "poolformer",
            "strip_mlp.models.poolformer",
            "PoolFormer",
            "create_poolformer",
            "strip_mlp.convert.poolformer",
            title="PoolFormer",
            summary_keys=("layers", "embed_dims", "num_classes"),
        ),
        Family(
            "raftmlp",
            "strip_mlp.models.raftmlp",
            "RaftMLP",
            "create_raftmlp",
            "strip_mlp.convert.raftmlp",
            title="RaftMLP",
            summary_keys=("dims", "depths", "img_size", "num_classes"),
        ),
        Family(
            "msmlp",
            "strip_mlp.models.msmlp",
            "MSMLP",
            "create_msmlp",
            "strip_mlp.convert.msmlp",
            title="MS-MLP",
            summary_keys=("embed_dim", "depths", "num_classes"),
        ),
    )
}


def all_variants() -> dict[str, str]:
  """{variant name: family name} over every family."""
  return {v: f.name for f in FAMILIES.values() for v in f.variants()}


def family_of_variant(variant: str) -> Family:
  family = all_variants().get(variant)
  if family is None:
    raise ConfigError(f"unknown model {variant!r}; choose one of {sorted(all_variants())}")
  return FAMILIES[family]


def create(variant: str, **overrides):
  """A model of a named variant of any family, with constructor overrides."""
  return family_of_variant(variant).create(variant, **overrides)


def family_of_model(model) -> Family:
  for f in FAMILIES.values():
    if type(model).__name__ == f.class_name and type(model).__module__ == f.model_module:
      return f
  raise TypeError(f"{type(model).__name__} is not a model of a registered family")


def model_config(model) -> dict:
  """The model's constructor keywords (JSON-able), with "family" unless Strip-MLP."""
  family = family_of_model(model)
  config = model.config_dict()
  return config if family.name == STRIP_MLP else {"family": family.name, **config}


def model_from_config(config: dict, **overrides) -> Any:
  """The model `model_config` described; `overrides` (None values ignored) change fields
  that do not alter the parameters' shapes (dtype, drop_path_rate, ...)."""
  config = dict(config)
  name = config.pop("family", STRIP_MLP)
  if name not in FAMILIES:
    raise ConfigError(f"unknown model family {name!r}; one of {sorted(FAMILIES)}")
  kwargs = {**config, **{k: v for k, v in overrides.items() if v is not None}}
  return FAMILIES[name].model_class()(**kwargs)


def detect_family(state_dict: dict) -> Family:
  """The family whose converter recognises the keys of `state_dict` (default Strip-MLP)."""
  for f in FAMILIES.values():
    if f.name != STRIP_MLP and getattr(f.converter(), f"is_{f.name}_state_dict")(state_dict):
      return f
  return FAMILIES[STRIP_MLP]


def state_dict_to_model(state_dict: dict, **model_overrides):
  """(model, variables) computing the function of a PyTorch state dict of any family; the
  architecture is read from the weights, `model_overrides` set the other fields."""
  family = detect_family(state_dict)
  conv = family.converter()
  arch = conv.infer_architecture(state_dict)
  clash = set(arch) & set(model_overrides)
  if clash:
    raise CheckpointFormatError(
        f"{sorted(clash)} are read from the weights and cannot be " "overridden"
    )
  model = family.model_class()(**arch, **model_overrides)
  return model, conv.state_dict_to_variables(state_dict, model)


def torch_to_flax(path: str, **model_overrides):
  """Reads a `.pth` of any registered family -> (model, variables)."""
  from strip_mlp.convert.torch_io import read_state_dict  # pylint: disable=g-import-not-at-top

  return state_dict_to_model(read_state_dict(path), **model_overrides)


def variables_to_state_dict(model, variables):
  """The official code's state dict (numpy) of `model`'s family for `variables`."""
  return family_of_model(model).converter().variables_to_state_dict(variables)
