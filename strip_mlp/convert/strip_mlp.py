"""PyTorch state dict <-> Flax variables for Strip-MLP, with strict accounting.

    from strip_mlp.convert import torch_to_flax
    model, variables = torch_to_flax("smlp_tiny_light.pth")
    logits = model.apply(variables, images_nhwc, train=False)

Every Flax leaf maps to one `state_dict` key by a rename (`torch_key`) and a layout
(`leaf_layout`): OIHW convs <-> HWIO, linear/1x1 (out, in) <-> (in, out), and the strip
projections' grouped (G*L, L, 1, 3) <-> (3, L, L, G). Nothing else is transformed.
"""

import collections
import re

import numpy as np

from strip_mlp.convert import torch_mapping as tm
from strip_mlp.errors import CheckpointFormatError
from strip_mlp.models.strip_mlp import ARCHITECTURE_KEYS, StripMLP, abstract_variables
from strip_mlp.convert.torch_io import read_state_dict

_MODULE_RENAMES = {
    "dwsc_bn": "dwsc.conv_merge.BN",
    "dwsc": "dwsc.conv_merge.Conv",
    "strip": None,  # the strip layer's parameters sit directly in `smlp_block`
    "bn": "BN",
    "mlp_fc": "mlp.0",
    "mlp_bn": "mlp.1",
    "reweight_fc1": "reweight.fc1",
    "reweight_fc2": "reweight.fc2",
}
_LEAF_RENAMES = {
    "kernel": "weight",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
}
_BLOCK = re.compile(r"blocks(\d)_(\d+)$")


def torch_key(path: tuple[str, ...]) -> str:
  """('params', 'blocks1_0', 'token_mixing', 'dwsc', 'kernel') -> state_dict key."""
  parts = []
  for name in path[1:-1]:
    m = _BLOCK.match(name)
    renamed = f"blocks{m[1]}.{m[2]}" if m else _MODULE_RENAMES.get(name, name)
    if renamed is not None:
      parts.append(renamed)
  parts.append(_LEAF_RENAMES.get(path[-1], path[-1]))
  return ".".join(parts)


def leaf_layout(path: tuple[str, ...], ndim: int) -> str:
  """How a Flax leaf is laid out relative to its PyTorch tensor."""
  parent, leaf = path[-2], path[-1]
  if parent in ("proj_h", "proj_w"):
    return "strip_" + leaf
  if leaf == "kernel" and ndim == 4:
    return "conv"
  if leaf == "kernel" and ndim == 2:
    linear = parent == "head" or (parent in ("fc1", "fc2") and "channel_mixing" in path)
    return "linear" if linear else "conv1x1"
  return "same"


def infer_architecture(sd: dict) -> dict:
  """embed_dim, layers, img_size, num_classes of a Strip-MLP state dict (0: no head)."""
  if "patch_embed.weight" not in sd:
    raise CheckpointFormatError(
        f"not a Strip-MLP state dict: no 'patch_embed.weight' (keys start with "
        f"{sorted(sd)[:4]}); convert weights of the official Strip-MLP code"
    )
  layers = [
      len({int(m[1]) for k in sd if (m := re.match(rf"blocks{s}\.(\d+)\.", k))})
      for s in range(1, 5)
  ]
  stage = next((s for s in range(4) if layers[s]), None)
  if stage is None:
    raise CheckpointFormatError("state dict has no blocks: cannot tell its image size")
  table = sd[f"blocks{stage + 1}.0.token_mixing.smlp_block.relate_pos_h.embeddings_table"]
  resolution = (table.shape[0] - 1) // 2
  return dict(
      embed_dim=int(sd["patch_embed.weight"].shape[0]),
      layers=tuple(layers),
      img_size=int(resolution * 4 * 2**stage),
      num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
  )


def state_dict_to_variables(sd: dict, model: StripMLP) -> dict:
  """Fills every Flax variable of `model` from `sd` ({key: array}); strict. A headless
  model (num_classes=0) ignores the head's tensors.

  Raises CheckpointFormatError naming missing, unexpected and mis-shaped keys.
  """
  sd = {
      k: v
      for k, v in sd.items()
      if not k.endswith("num_batches_tracked")
      and not (model.num_classes == 0 and k.startswith("head."))
  }
  arch = ", ".join(f"{k}={v}" for k, v in model.config_dict().items() if k in ARCHITECTURE_KEYS)
  return tm.state_dict_to_variables(
      sd, abstract_variables(model), torch_key, _layout, f"StripMLP({arch})"
  )


def variables_to_state_dict(variables) -> "collections.OrderedDict[str, np.ndarray]":
  """Flax variables -> the official code's state dict as numpy arrays.

  BatchNorm `num_batches_tracked` counters are included (as 0) so that
  `load_state_dict(strict=True)` accepts it.
  """
  sd = collections.OrderedDict()
  for key, a in tm.variables_to_state_dict(variables, torch_key, _layout).items():
    sd[key] = a
    if key.endswith("running_var"):
      sd[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  return sd


def _layout(path: tuple[str, ...], ndim: int) -> tm.Layout:
  return tm.LAYOUTS[leaf_layout(path, ndim)]


def flax_to_torch(variables) -> "collections.OrderedDict":
  """Flax variables -> a PyTorch state dict (torch tensors) for the official model."""
  import torch  # pylint: disable=g-import-not-at-top

  return collections.OrderedDict(
      (k, torch.from_numpy(v)) for k, v in variables_to_state_dict(variables).items()
  )


def torch_to_flax(path: str, **model_overrides):
  """Reads a released `.pth` -> (StripMLP, variables) computing the same function.

  The architecture is read from the weights; `model_overrides` may set other
  StripMLP fields (dtype, drop_path_rate, depthwise_impl, patchify_impl, remat), and
  num_classes=0 drops the head (a backbone; a state dict without head gives one anyway).
  """
  sd = read_state_dict(path)
  arch = infer_architecture(sd)
  if model_overrides.get("num_classes") == 0:
    arch["num_classes"] = model_overrides.pop("num_classes")
  clash = set(arch) & set(model_overrides)
  if clash:
    raise ValueError(f"{sorted(clash)} are read from the weights and cannot be overridden")
  model = StripMLP(**arch, **model_overrides)
  return model, state_dict_to_variables(sd, model)
