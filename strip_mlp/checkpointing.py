"""Training checkpoints: an orbax CheckpointManager with resume, keep-last/keep-best and
fine-tuning initialisation from converted PyTorch weights.

Layout: WORKDIR/checkpoints/<step>/{state, meta}
  state: the whole train state as a nested dict (flax.serialization.to_state_dict):
         step, params, batch_stats, opt_state, ema
  meta:  JSON: step (= data position for the input pipeline), epoch, best eval top-1,
         the model's constructor keywords, process/device counts at save time.

Orbax writes every checkpoint into a temporary directory and renames it only when all
processes have finished writing (plus a commit marker on object stores), so a crash
mid-save leaves no directory that `latest_step` would return; leftovers are deleted when
the next manager opens the directory. Arrays are stored per shard with their global shape,
so a checkpoint restores onto any number of devices/processes: pass targets that carry the
new shardings.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as ocm

from strip_mlp.errors import UserError

STATE = "state"
META = "meta"
HEAD = "head"  # name of the classifier in the model's params


class CheckpointMismatchError(UserError, ValueError):
  """A stored checkpoint does not fit the model/optimizer being trained."""


def shape_map(tree: Any) -> dict[str, tuple]:
  """{'a/b/c': shape} of the leaves of a nested dict (arrays or orbax metadata)."""
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
  return {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in flat.items()
          if not (isinstance(v, dict) and not v)}


def describe_mismatch(stored: dict, expected: dict, limit: int = 3) -> str | None:
  """None when the two {path: shape} maps agree, else a short description."""
  problems = []
  for k in sorted(set(stored) | set(expected)):
    if k not in stored:
      problems.append(f"{k} missing from the checkpoint")
    elif k not in expected:
      problems.append(f"{k} not in the model")
    elif tuple(stored[k]) != tuple(expected[k]):
      problems.append(f"{k} is {tuple(stored[k])} in the checkpoint but {tuple(expected[k])} now")
  if not problems:
    return None
  more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
  return "; ".join(problems[:limit]) + more


class Checkpointer:
  """Saves/restores train states under `directory` (shared by all processes).

  keep: the newest `keep` checkpoints are kept; keep_best: also the one with the highest
  eval top-1 among those saved with metrics. Every process must call save/restore (they
  are collective); only process 0 writes the shared metadata.

  read_only=True opens an existing directory for reading (eval.py): nothing is created,
  cleaned up or deleted, so a training job writing there is safe.
  """

  def __init__(self, directory: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    best = dict(best_fn=lambda m: m["top1"], best_mode="max")  # also makes orbax store metrics
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, **best)
    else:
      policies = [ocm.LatestN(n=keep)]
      if keep_best:
        policies.append(ocm.BestN(get_metric_fn=lambda m: m["top1"], n=1,
                                  keep_checkpoints_without_metrics=False))
      options = ocp.CheckpointManagerOptions(
          create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
          preservation_policy=ocm.AnyPreservationPolicy(policies=policies), **best)
    level = logging.get_verbosity()
    if read_only:
      logging.set_verbosity(logging.ERROR)  # orbax's "directory is read only": intended
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={STATE: ocp.StandardCheckpointHandler(),
                         META: ocp.JsonCheckpointHandler()})
    finally:
      logging.set_verbosity(level)

  # --------------------------------------------------------------------------- queries
  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest complete checkpoint (half-written ones are never listed)."""
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  # --------------------------------------------------------------------------- save
  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> bool:
    """Starts saving `state` (a pytree; stored as a nested dict) at `step`.

    Returns False when a checkpoint of this step exists already. Asynchronous: arrays are
    copied to host memory before returning, so the caller may donate/overwrite `state`;
    `wait()` blocks until the files are committed.
    """
    step = int(step)
    if step in self.manager.all_steps():
      return False
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self.manager.save(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(serialization.to_state_dict(state)),
            META: ocp.args.JsonSave(dict(meta, step=step))}),
        metrics=metrics, force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  # --------------------------------------------------------------------------- restore
  def read_meta(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META])

  def check_compatible(self, step: int, target: Any, model_config: dict | None = None):
    """Raises CheckpointMismatchError (one line saying what to do) if checkpoint `step`
    does not fit `target` (the abstract train state)."""
    where = os.path.join(self.directory, str(step))
    hint = (f"start a fresh --workdir, or train with the config that wrote it "
            f"({os.path.dirname(self.directory)}/config.json)")
    if model_config is not None:
      stored = self.read_meta(step).get("model")
      if stored is not None:
        diff = {k: (stored.get(k), v) for k, v in model_config.items()
                if k in _SHAPE_KEYS and _norm(stored.get(k)) != _norm(v)}
        if diff:
          desc = ", ".join(f"{k} {a!r} in the checkpoint vs {b!r} now"
                           for k, (a, b) in sorted(diff.items()))
          raise CheckpointMismatchError(
              f"checkpoint {where} was written for a different model ({desc}); {hint}")
    tree = self.manager.item_metadata(step)[STATE]
    tree = getattr(tree, "tree", tree)
    problem = describe_mismatch(shape_map(tree),
                                shape_map(serialization.to_state_dict(target)))
    if problem:
      raise CheckpointMismatchError(
          f"checkpoint {where} does not fit the model/optimizer being trained: {problem}; {hint}")

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`; `target` is a pytree of ShapeDtypeStructs with
    the shardings wanted now (any device count), of the same structure as the saved state."""
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(serialization.to_state_dict(target)),
        META: ocp.args.JsonRestore()}))
    state = serialization.from_state_dict(target, restored[STATE])
    return state, dict(restored[META])


_SHAPE_KEYS = ("embed_dim", "layers", "img_size", "num_classes")


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


# ----------------------------------------------------------------------------- fine-tuning

def load_pretrained(path: str) -> tuple[dict, dict]:
  """(model keywords, {'params', 'batch_stats'} as numpy) of pretrained weights at `path`:
  a directory written by `convert_torch_weights.py`/`strip_mlp.save_checkpoint`, or a
  PyTorch .pth file (converted on the fly; needs torch)."""
  if os.path.isdir(path):
    from strip_mlp import load_checkpoint  # pylint: disable=g-import-not-at-top
    model, variables = load_checkpoint(path)
  elif os.path.isfile(path):
    from strip_mlp.convert import torch_to_flax  # pylint: disable=g-import-not-at-top
    model, variables = torch_to_flax(path)
  else:
    raise FileNotFoundError(
        f"init_from={path!r} does not exist; give a converted checkpoint directory "
        "(python convert_torch_weights.py IN.pth OUT_DIR) or a .pth file")
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  return model.config_dict(), {"params": variables["params"],
                               "batch_stats": variables.get("batch_stats", {})}


def merge_pretrained(target: dict, pretrained: dict, *, source: str = "pretrained"
                     ) -> tuple[dict, list[str]]:
  """Takes every leaf of `target` ({'params', 'batch_stats'}, numpy or jax) from
  `pretrained` when the shapes agree; the classifier `head` is kept from `target` (freshly
  initialised) when the class counts differ. Any other mismatch raises with what to change.

  Returns (merged, names of the re-initialised leaves).
  """
  tflat = traverse_util.flatten_dict(target, sep="/")
  pflat = traverse_util.flatten_dict(pretrained, sep="/")
  merged, reinit, problems = {}, [], []
  for k, v in tflat.items():
    is_head = k.split("/")[1:2] == [HEAD]
    if k in pflat and np.shape(pflat[k]) == np.shape(v):
      merged[k] = np.asarray(pflat[k], dtype=getattr(v, "dtype", None))
    elif is_head:
      merged[k] = v
      reinit.append(k)
    else:
      problems.append(f"{k}: {np.shape(pflat[k]) if k in pflat else 'missing'} in {source} "
                      f"vs {tuple(np.shape(v))} in the model")
  extra = [k for k in pflat if k not in tflat]
  if problems or extra:
    desc = "; ".join(problems[:3] + [f"{k} only in {source}" for k in extra[:2]])
    raise CheckpointMismatchError(
        f"{source} weights do not fit the model ({desc}); use the variant, embed_dim, "
        "layers and model.img_size of the checkpoint (only the number of classes may differ)")
  return traverse_util.unflatten_dict(merged, sep="/"), reinit
