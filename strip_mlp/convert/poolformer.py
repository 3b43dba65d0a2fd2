"""Official PoolFormer state dicts <-> Flax variables, with strict accounting.

    from strip_mlp.convert.poolformer import torch_to_flax
    model, variables = torch_to_flax("poolformer_s12.pth.tar")
    logits = model.apply(variables, images_nhwc)

Released files are plain state dicts; {'model': ...} and {'state_dict': ...} wrappers and
`module.` prefixes are accepted too (`strip_mlp.convert.torch_io`, which never runs pickled code).
Layouts: convs OIHW <-> HWIO, the MLP's 1x1 convs (O, I, 1, 1) <-> (I, O), the head
(O, I) <-> (I, O); norms and layer scales as they are.
"""

import re

import numpy as np

from strip_mlp.convert import torch_mapping as tm
from strip_mlp.models.poolformer import VARIANTS, PoolFormer, PoolFormerConfigError
from strip_mlp.convert.torch_io import CheckpointFormatError, read_state_dict

_NETWORK = re.compile(r"network_(\d+)(?:_(\d+))?$")
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight"}
_ARCH_FIELDS = ("layers", "embed_dims", "mlp_ratios", "use_layer_scale", "num_classes")
_PROBE_SIZE = 32  # any size works; the parameters do not depend on it


def torch_key(path: tuple) -> str:
  """('params', 'network_0_1', 'mlp', 'fc1', 'kernel') -> 'network.0.1.mlp.fc1.weight'."""
  parts = []
  for name in path[1:-1]:
    m = _NETWORK.match(name)
    parts.append(".".join(g for g in ("network",) + m.groups() if g) if m else name)
  parts.append(_LEAF_RENAMES.get(path[-1], path[-1]))
  return ".".join(parts)


def leaf_layout(path: tuple, ndim: int) -> tm.Layout:
  if path[-1] == "kernel" and ndim == 4:
    return tm.CONV
  if path[-1] == "kernel":
    return tm.LINEAR if path[-2] == "head" else tm.CONV1X1
  return tm.SAME


def is_poolformer_state_dict(sd: dict) -> bool:
  """True for the keys of the official PoolFormer (classification) model."""
  return "patch_embed.proj.weight" in sd and any(
      re.match(r"network\.\d+\.\d+\.mlp\.fc1\.weight$", k) for k in sd
  )


def _mlp_ratio(hidden: int, dim: int):
  """A ratio r with int(dim * r) == hidden, as the official code sizes the MLP."""
  ratio = hidden / dim
  while int(dim * ratio) < hidden:
    ratio = float(np.nextafter(ratio, np.inf))
  return int(ratio) if ratio == int(ratio) else ratio


def infer_architecture(sd: dict) -> dict:
  """PoolFormer keywords (layers, embed_dims, mlp_ratios, use_layer_scale, num_classes, and
  layer_scale_init_value for a released variant) read from the keys and shapes.

  `pool_size` is not in the weights: it stays 3 (every released model) unless given.
  """
  if not is_poolformer_state_dict(sd):
    raise CheckpointFormatError(
        f"not a PoolFormer state dict: no 'patch_embed.proj.weight' / 'network.*.mlp.fc1' "
        f"keys (keys start with {sorted(sd)[:4]}); convert weights of the official PoolFormer"
    )
  dims = [sd["patch_embed.proj.weight"].shape[0]]
  for i in range(3):
    key = f"network.{2 * i + 1}.proj.weight"
    if key not in sd:
      raise CheckpointFormatError(
          f"PoolFormer state dict without {key!r}: the official "
          "models downsample between all four stages"
      )
    dims.append(sd[key].shape[0])
  layers = [
      len({int(m[1]) for k in sd if (m := re.match(rf"network\.{2 * i}\.(\d+)\.", k))})
      for i in range(4)
  ]
  ratios = [
      _mlp_ratio(sd[f"network.{2 * i}.0.mlp.fc1.weight"].shape[0], dims[i]) if layers[i] else 4
      for i in range(4)
  ]
  arch = dict(
      layers=tuple(layers),
      embed_dims=tuple(int(d) for d in dims),
      mlp_ratios=tuple(ratios),
      use_layer_scale=any(".layer_scale_1" in k for k in sd),
      num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
  )
  for variant in VARIANTS.values():
    if (variant["layers"], variant["embed_dims"]) == (arch["layers"], arch["embed_dims"]):
      arch["layer_scale_init_value"] = variant["layer_scale_init_value"]
  return arch


def state_dict_to_variables(sd: dict, model: PoolFormer) -> dict:
  """Every Flax variable of `model` from `sd` ({key: array}); strict, one-line errors."""
  cfg = model.config_dict()
  return tm.state_dict_to_variables(
      sd,
      tm.abstract_variables(model, _PROBE_SIZE),
      torch_key,
      leaf_layout,
      tm.describe("PoolFormer", cfg, _ARCH_FIELDS),
  )


def variables_to_state_dict(variables):
  """Flax variables -> the official model's state dict (OrderedDict of numpy arrays)."""
  return tm.variables_to_state_dict(variables, torch_key, leaf_layout)


def torch_to_flax(path: str, **model_overrides):
  """Reads an official `.pth` / `.pth.tar` -> (PoolFormer, variables), same function.

  The architecture is read from the weights; `model_overrides` may set the other fields
  (pool_size, dtype, drop_path_rate).
  """
  sd = read_state_dict(path)
  arch = infer_architecture(sd)
  clash = set(_ARCH_FIELDS) & set(model_overrides)
  if clash:
    raise PoolFormerConfigError(
        f"{sorted(clash)} are read from the weights and cannot be overridden"
    )
  model = PoolFormer(**{**arch, **model_overrides})
  return model, state_dict_to_variables(sd, model)
