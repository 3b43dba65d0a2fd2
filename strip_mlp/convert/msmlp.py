"""Official MS-MLP PyTorch state dicts <-> Flax variables of `MSMLP`, with strict accounting.

    from strip_mlp.convert.msmlp import torch_to_flax
    model, variables = torch_to_flax("msmlp_tiny_patch4_ckpt_epoch299.pth")
    logits = model.apply(variables, images_nhwc)

Every Flax leaf maps to one `state_dict` key by a rename (`torch_key`: `layers_0` ->
`layers.0`, `kernel`/`scale` -> `weight`) and a layout (`leaf_layout`): convolutions HWIO
<-> OIHW, linear layers (in, out) <-> (out, in); nothing else is transformed.
"""

import collections
import re

import numpy as np

from strip_mlp.convert import torch_mapping as tm
from strip_mlp.models.strip_mlp import abstract_variables
from strip_mlp.models.msmlp import MSMLP
from strip_mlp.convert.torch_io import CheckpointFormatError, read_state_dict

_LEAF_RENAMES = {"kernel": "weight", "scale": "weight"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_ARCHITECTURE_KEYS = (
    "embed_dim",
    "depths",
    "patch_size",
    "in_chans",
    "num_classes",
    "shift_dist",
    "mix_size",
    "mlp_ratio",
    "patch_norm",
    "layer_scale_init_value",
)


def torch_key(path: tuple[str, ...]) -> str:
  """('params', 'layers_0', 'blocks_1', 'dwconv_lr_2', 'kernel') -> state_dict key."""
  parts = [_INDEXED.sub(r"\1.\2", name) for name in path[1:-1]]
  return ".".join(parts + [_LEAF_RENAMES.get(path[-1], path[-1])])


def leaf_layout(path: tuple[str, ...], ndim: int) -> str:
  """How a Flax leaf is laid out relative to its PyTorch tensor ('conv'|'linear'|'same')."""
  if path[-1] == "kernel":
    return {4: "conv", 2: "linear"}[ndim]
  return "same"


def is_msmlp_state_dict(sd) -> bool:
  """Whether the keys of `sd` are those of the official MS-MLP (mix-shift blocks)."""
  return "patch_embed.proj.weight" in sd and any(".dwconv_lr." in k for k in sd)


def _mlp_ratio(hidden: dict[int, int]) -> float:
  """The mlp_ratio r with int(r * C) == hidden width for every stage width C seen."""
  for c, h in sorted(hidden.items()):
    ratio = h / c
    if all(int(ratio * cc) == hh for cc, hh in hidden.items()):
      return ratio
  raise CheckpointFormatError(
      f"the mlp hidden widths {hidden} (per stage width) follow no "
      "single mlp_ratio; this is no MS-MLP state dict"
  )


def infer_architecture(sd: dict) -> dict:
  """MSMLP keywords read from the shapes of an official state dict.

  shift_dist cannot be read from weights: for G groups it is the centred range
  (-(G // 2) .. G - 1 - G // 2), the released (-2, -1, 0, 1, 2) for G = 5. img_size is
  not tied to any weight either: the model takes any multiple of 32 (224 is the default).
  """
  if not is_msmlp_state_dict(sd) or "norm.weight" not in sd:
    raise CheckpointFormatError(
        "not an MS-MLP state dict: no 'patch_embed.proj.weight', 'norm.weight' or "
        f"'*.dwconv_lr.*' keys (keys start with {sorted(sd)[:4]}); convert weights of the "
        "official MS-MLP code"
    )
  embed_dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
  stages = int(np.log2(sd["norm.weight"].shape[0] // embed_dim)) + 1
  blocks = collections.defaultdict(set)
  for k in sd:
    if m := _BLOCK.match(k):
      blocks[int(m[1])].add(int(m[2]))
  if not blocks:
    raise CheckpointFormatError("MS-MLP state dict without blocks: cannot tell its layout")
  s0 = min(blocks)
  groups = len({k for k in sd if k.startswith(f"layers.{s0}.blocks.0.dwconv_lr.")}) // 2
  mix, hidden = [], {}
  for s in range(stages):
    prefix = f"layers.{s}.blocks.0."
    if s not in blocks:  # no blocks: the kernel sizes of this stage are never used
      mix.append([1] * groups)
      continue
    mix.append([int(sd[f"{prefix}dwconv_lr.{g}.weight"].shape[-1]) for g in range(groups)])
    hidden[embed_dim * 2**s] = int(sd[f"{prefix}pwconv1.weight"].shape[0])
  return dict(
      embed_dim=int(embed_dim),
      depths=[len(blocks[s]) for s in range(stages)],
      patch_size=int(patch),
      in_chans=int(in_chans),
      num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
      shift_dist=list(range(-(groups // 2), groups - groups // 2)),
      mix_size=mix,
      mlp_ratio=_mlp_ratio(hidden) if hidden else 4.0,
      patch_norm="patch_embed.norm.weight" in sd,
      layer_scale_init_value=1e-6 if any(k.endswith(".gamma") for k in sd) else 0.0,
  )


def state_dict_to_variables(sd: dict, model: MSMLP) -> dict:
  """Fills every Flax variable of `model` from `sd` ({key: array}); strict: each tensor
  is used exactly once. Raises CheckpointFormatError naming missing, unexpected and
  mis-shaped keys in one line."""
  arch = ", ".join(f"{k}={v}" for k, v in model.config_dict().items() if k in _ARCHITECTURE_KEYS)
  return tm.state_dict_to_variables(
      sd, abstract_variables(model), torch_key, _layout, f"MSMLP({arch})"
  )


def variables_to_state_dict(variables) -> "collections.OrderedDict[str, np.ndarray]":
  """Flax variables -> the official code's state dict (numpy float32, PyTorch layouts)."""
  return tm.variables_to_state_dict(variables, torch_key, _layout)


def _layout(path: tuple[str, ...], ndim: int) -> tm.Layout:
  return tm.LAYOUTS[leaf_layout(path, ndim)]


def torch_to_flax(path: str, **model_overrides):
  """Reads an official `.pth` ({'model': sd}, {'state_dict': sd} or a bare state dict) ->
  (MSMLP, variables) computing the same function. The architecture is read from the
  weights; `model_overrides` may set the other fields (img_size, dtype, drop rates, impls).
  """
  sd = read_state_dict(path)
  arch = infer_architecture(sd)
  clash = set(arch) & (set(model_overrides) - {"shift_dist"})
  if clash:
    raise CheckpointFormatError(
        f"{sorted(clash)} are read from the weights and cannot be "
        "overridden; drop them from the model options"
    )
  model = MSMLP(**{**arch, **model_overrides})
  return model, state_dict_to_variables(sd, model)
