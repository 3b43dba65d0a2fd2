"""Strip-MLP (Cao et al., ICCV 2023) in JAX/Flax.

    from strip_mlp import create_model, load_checkpoint
    model = create_model('tiny_light', num_classes=1000, img_size=224)
    model, variables = load_checkpoint('converted_dir')   # from convert_torch_weights.py

Importing the package needs neither TensorFlow nor PyTorch, and not even JAX: the names
below load their module on first use (PEP 562), so a light module such as
strip_mlp.runtime.supervisor starts in milliseconds.
"""

import importlib

_EXPORTS = {
    "load_checkpoint": "strip_mlp.checkpoints.model_checkpoint",
    "save_checkpoint": "strip_mlp.checkpoints.model_checkpoint",
    "VARIANTS": "strip_mlp.models.strip_mlp",
    "StripMLP": "strip_mlp.models.strip_mlp",
    "count_params": "strip_mlp.models.strip_mlp",
    "create_model": "strip_mlp.models.strip_mlp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'strip_mlp' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
