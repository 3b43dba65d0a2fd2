"""Data: config, sources, embedded dataset, per-example transforms and the host pipeline.

    from strip_mlp.data import config     # TF-free: default_data_config(), names, defaults
    from strip_mlp.data import pipeline   # imports TensorFlow: dataset info, iterators

Only the modules of this package import TensorFlow / TFDS, and only when they are imported
themselves: importing `strip_mlp.data` or `strip_mlp.data.config` imports neither
(`import_tensorflow_quietly` imports TensorFlow when called).
"""

import os
import sys
import tempfile


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
