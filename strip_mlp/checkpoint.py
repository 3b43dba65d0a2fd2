"""Model checkpoints on disk: an orbax tree of variables with the model's config beside it.

    DIR/config.json     {"format": "strip_mlp.model/1", "model": StripMLP keywords}
    DIR/variables/      orbax StandardCheckpointer tree {'params', 'batch_stats'}

Written by `convert_torch_weights.py` (or `save_checkpoint`), read by `load_checkpoint`.
A checkpoint is staged in a temporary sibling directory and renamed into place, so a
crash never leaves a half-written DIR.
"""
import json
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp

from strip_mlp.model import StripMLP

FORMAT = "strip_mlp.model/1"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def save_checkpoint(directory: str, model: StripMLP, variables) -> str:
  """Writes `variables` of `model` to a new `directory` (single process). Returns its path.

  Refuses to overwrite a non-empty directory.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise FileExistsError(f"{directory} already exists and is not empty; "
                          "choose a new output directory or delete it first")
  parent = os.path.dirname(directory)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
  except OSError as e:
    raise OSError(f"cannot write to {parent}: {e.strerror}; choose a writable output "
                  "directory") from None
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      json.dump({"format": FORMAT, "model": model.config_dict()}, f, indent=2)
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.rename(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def read_model_config(directory: str) -> dict:
  """The StripMLP keywords stored in a checkpoint directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory} is not a Strip-MLP checkpoint (no {CONFIG_FILE}); create one with "
        "`python convert_torch_weights.py IN.pth OUT_DIR`")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta["model"]


def load_checkpoint(directory: str, **model_overrides):
  """Reads a checkpoint directory -> (StripMLP, variables).

  `model_overrides` change fields that do not alter the weights' shapes, e.g.
  dtype='bfloat16', drop_path_rate=0.2, depthwise_impl='xla'.
  """
  from strip_mlp.convert import abstract_variables  # pylint: disable=g-import-not-at-top
  model = StripMLP(**{**read_model_config(directory), **model_overrides})
  # Restored onto this process's first device, also when several processes run.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      abstract_variables(model))
  variables = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), VARIABLES_DIR), target)
  return model, variables
