"""Fine-tuning: pretrained weights from any checkpoint path, fitted to the model being
trained (the head re-initialised when the class count differs; Strip-MLP's strip-length
tensors resampled for another training resolution)."""

import os

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from strip_mlp.checkpoints import model_checkpoint
from strip_mlp.models import registry
from strip_mlp.runtime import sharding
from strip_mlp.errors import CheckpointMismatchError, NotACheckpointError
from strip_mlp.checkpoints.model_checkpoint import WEIGHTS
from strip_mlp.checkpoints.tree_diff import mismatches, shape_map, summarize

HEAD = "head"  # name of the classifier in every family's params


def load_pretrained(path: str, img_size: int | None = None) -> tuple[dict, dict]:
  """(model keywords, {'params', 'batch_stats'} as numpy) of pretrained weights at `path`:
  any path `load_weights` reads (a converted directory, a .pth file, a training workdir),
  read by each process onto its first local device. With `img_size` (Strip-MLP), the
  strip-length tensors are resampled to that training resolution (`strip_mlp.models.resample`)."""
  if not os.path.exists(path):
    raise NotACheckpointError(
        f"init_from={path!r} does not exist; give a converted checkpoint directory "
        "(python convert_torch_weights.py IN.pth OUT_DIR), a .pth file or a training workdir"
    )
  loaded = model_checkpoint.load_weights(
      path, mesh=Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
  )
  variables = jax.tree_util.tree_map(np.asarray, dict(loaded.variables))
  model = loaded.model
  if img_size is not None and img_size != getattr(model, "img_size", img_size):
    from strip_mlp.models import resample  # pylint: disable=g-import-not-at-top

    target = model.clone(img_size=img_size)
    variables = jax.tree_util.tree_map(
        np.asarray,
        resample.resample_variables({k: variables.get(k, {}) for k in WEIGHTS}, model, target),
    )
    model = target
  return registry.model_config(model), {k: variables.get(k, {}) for k in WEIGHTS}


def merge_pretrained(
    target: dict, pretrained: dict, *, source: str = "pretrained"
) -> tuple[dict, list[str]]:
  """Takes every leaf of `target` ({'params', 'batch_stats'}, numpy or jax) from
  `pretrained` when the shapes agree; the classifier `head` is kept from `target` (freshly
  initialised) when the class counts differ. Any other mismatch raises with what to change.

  Returns (merged, names of the re-initialised leaves).
  """
  tflat = traverse_util.flatten_dict(target, sep="/")
  pflat = traverse_util.flatten_dict(pretrained, sep="/")
  problems = mismatches(shape_map(pretrained), shape_map(target), f"{source}", "in the model")
  reinit = sorted(
      k
      for k in tflat
      if k.split("/")[1:2] == [HEAD]
      and (k not in pflat or np.shape(pflat[k]) != np.shape(tflat[k]))
  )
  problems = [p for p in problems if p.split(" ")[0] not in reinit]
  if problems:
    raise CheckpointMismatchError(
        f"{source} weights do not fit the model ({summarize(problems, 5)}); use the variant, "
        "embed_dim, layers and model.img_size of the checkpoint (only the number of classes "
        "may differ), or --config.init_resize=interpolate for weights of another img_size"
    )
  merged = {
      k: v if k in reinit else np.asarray(pflat[k], dtype=getattr(v, "dtype", None))
      for k, v in tflat.items()
  }
  return traverse_util.unflatten_dict(merged, sep="/"), reinit


def pretrained_onto(path: str, target: dict, img_size: int | None = None) -> tuple[dict, list[str]]:
  """Pretrained {'params', 'batch_stats'} from `path` as global arrays in the shardings of
  `target` (the abstract variables being trained), None for the leaves to re-initialise
  (the head when the class count differs), and their names. `img_size`: resample the
  weights to it first (see `load_pretrained`). Raises CheckpointMismatchError for any
  other difference."""
  _, pretrained = load_pretrained(path, img_size)
  merged, reinit = merge_pretrained(target, pretrained, source=path)
  flat = traverse_util.flatten_dict(merged, sep="/")
  for k in reinit:
    flat[k] = None
  merged = traverse_util.unflatten_dict(flat, sep="/")
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
  placed = jax.tree_util.tree_map(
      lambda x, s: None if x is None else sharding.put_global(x, s),
      merged,
      shardings,
      is_leaf=lambda x: x is None,
  )
  return placed, reinit
