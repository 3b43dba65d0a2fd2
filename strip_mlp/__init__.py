"""Strip-MLP in JAX/Flax."""
from strip_mlp.model import VARIANTS, StripMLP, count_params, create_model

__all__ = ["VARIANTS", "StripMLP", "count_params", "create_model"]
