"""Strip-MLP (Cao et al., ICCV 2023) in JAX/Flax.

    from strip_mlp import create_model, load_checkpoint
    model = create_model('tiny_light', num_classes=1000, img_size=224)
    model, variables = load_checkpoint('converted_dir')   # from convert_torch_weights.py

Importing the package needs neither TensorFlow nor PyTorch.
"""

from strip_mlp.model_checkpoint import load_checkpoint, save_checkpoint
from strip_mlp.model import VARIANTS, StripMLP, count_params, create_model

__all__ = [
    "VARIANTS",
    "StripMLP",
    "count_params",
    "create_model",
    "load_checkpoint",
    "save_checkpoint",
]
