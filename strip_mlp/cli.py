"""Command-line plumbing shared by train.py and eval.py."""
import os
import sys
import tempfile

DEFAULT_COMPILATION_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                         "strip_mlp", "jax_compilation_cache")


def import_tensorflow_quietly():
  """Imports TensorFlow with its C++ start-up notices (oneDNN, CPU features) dropped: they
  bypass TF_CPP_MIN_LOG_LEVEL and go straight to fd 2. Replayed if the import fails."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except Exception:
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def compilation_cache_dir(flag_value: str | None) -> str:
  """--compilation_cache_dir, else $JAX_COMPILATION_CACHE_DIR, else the default; '' = off."""
  if flag_value is None:
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
  return flag_value
