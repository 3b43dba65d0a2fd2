"""Command-line plumbing shared by train.py and eval.py."""
import os

DEFAULT_COMPILATION_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                         "strip_mlp", "jax_compilation_cache")


def compilation_cache_dir(flag_value: str | None) -> str:
  """--compilation_cache_dir, else $JAX_COMPILATION_CACHE_DIR, else the default; '' = off."""
  if flag_value is None:
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
  return flag_value
