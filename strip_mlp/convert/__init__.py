"""PyTorch interop of every family: safe .pth reading, the strict state-dict mapping, converters.

Strip-MLP's converter is re-exported here (`from strip_mlp.convert import torch_to_flax`);
the relatives' are `strip_mlp.convert.<family>`. Importing this needs no PyTorch.
"""

from strip_mlp.convert.strip_mlp import (
    flax_to_torch,
    infer_architecture,
    leaf_layout,
    state_dict_to_variables,
    torch_key,
    torch_to_flax,
    variables_to_state_dict,
)

__all__ = [
    "flax_to_torch",
    "infer_architecture",
    "leaf_layout",
    "state_dict_to_variables",
    "torch_key",
    "torch_to_flax",
    "variables_to_state_dict",
]
