"""Training checkpoints: an orbax CheckpointManager with resume and keep-last/keep-best
(fine-tuning initialisation, `load_pretrained`/`merge_pretrained`, lives in checkpoint.py).

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

A save that fails (disk full, permissions) raises CheckpointSaveError, one line, from
whichever call first sees it (save, newly_committed, wait or close); the previous
checkpoint stays the latest and its temporary directory is deleted on the next open.
`newly_committed()` and `wait()` name the steps whose files are committed, so "saved" is
announced only then. Orbax's warnings about expected situations (read-only opening, saves
without metrics) and its tracebacks of a failed save are not logged.
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as ocm

from strip_mlp.checkpoint import (  # noqa: F401  (fine-tuning: re-exported)
    HEAD, CheckpointMismatchError, StorageNoiseFilter, format_bytes, is_storage_error,
    load_pretrained, merge_pretrained, storage_error_reason, tree_nbytes)
from strip_mlp.errors import UserError

STATE = "state"
META = "meta"


class CheckpointSaveError(UserError, OSError):
  """Writing a checkpoint failed; the message (one line) names the step, the directory, the
  cause, the size needed and the intact checkpoint a rerun resumes from (or none)."""


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

  Invariants: at most one save is in flight (orbax waits for the previous one); a step is
  reported by `newly_committed()`/`wait()` once, after its directory is final; after a
  failed save the manager lists only the checkpoints on disk, and close() raises nothing
  more.
  """

  def __init__(self, directory: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self._async = async_save and not read_only
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight
    self._committed: list[int] = []                # finished, not reported yet
    self._failed = False                           # a CheckpointSaveError was raised
    self._closed = False
    best = dict(best_fn=lambda m: m["top1"], best_mode="max")  # also makes orbax store metrics
    if read_only:  # save_interval_steps=0: orbax would warn that it sets it so
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False,
          save_interval_steps=0, **best)
    else:
      policies = [ocm.LatestN(n=keep)]
      if keep_best:
        policies.append(ocm.BestN(get_metric_fn=lambda m: m["top1"], n=1,
                                  keep_checkpoints_without_metrics=False))
      options = ocp.CheckpointManagerOptions(
          create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
          preservation_policy=ocm.AnyPreservationPolicy(policies=policies), **best)
    self._filter = StorageNoiseFilter(self.directory).attach()
    try:
      with self._filter.quiet(_READ_ONLY_WARNING if read_only else None):
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(),
                           META: ocp.JsonCheckpointHandler()})
    except BaseException:
      self._filter.detach()
      raise
    # Orbax deletes leftover temporary directories in a background thread that only save()
    # waits for; wait now, so the directory is settled and no thread outlives close().
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

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

    Returns True when the save started (with async_save=False: when it is committed),
    False when a checkpoint of this step exists already. Asynchronous: arrays are copied
    to host memory before returning, so the caller may donate/overwrite `state`; the step
    is on disk once `newly_committed()` or `wait()` returns it. Raises CheckpointSaveError
    when this save, or the previous one still in flight, fails.
    """
    step = int(step)
    self._finish()  # orbax waits for the previous save anyway: report it as that step's
    if step in self.manager.all_steps():
      return False
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    nbytes = tree_nbytes(state)
    try:
      with self._filter.quiet(_NO_METRICS_WARNING if metrics is None else None):
        started = self.manager.save(
            step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(serialization.to_state_dict(state)),
                META: ocp.args.JsonSave(dict(meta, step=step))}),
            metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except  # storage errors only, below
      self._raise_save_error(step, nbytes, e)
    if started:
      if self._async:
        self._pending = (step, nbytes)
      else:
        self._committed.append(step)
    return bool(started)

  def newly_committed(self) -> list[int]:
    """Steps whose save has been committed since the last call of this or `wait()`,
    oldest first; never blocks. Raises CheckpointSaveError if the save in flight failed.

    Per process (processes may see a step a moment apart): use it for messages, not for
    decisions all processes must agree on.
    """
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish()  # the background save has ended: joining it does not block
    return self._take_committed()

  def wait(self) -> list[int]:
    """Blocks until the save in flight is committed; returns the steps committed since
    the last `newly_committed()`/`wait()`, oldest first. Raises CheckpointSaveError."""
    self._finish()
    return self._take_committed()

  def close(self):
    """Waits for the save in flight (CheckpointSaveError if it fails) and stops orbax's
    threads. Idempotent; after a CheckpointSaveError it raises nothing more."""
    if self._closed:
      return
    self._closed = True
    try:
      self._finish()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
      if not self._failed:  # after a failure, asyncio may still log its writes at exit
        self._filter.detach()

  def _take_committed(self) -> list[int]:
    steps, self._committed = self._committed, []
    return steps

  def _finish(self):
    """Blocks until the save in flight ends; records it as committed or raises."""
    if self._pending is None:
      return
    step, nbytes = self._pending
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # storage errors only, below
      self._raise_save_error(step, nbytes, e)
    self._pending = None
    self._committed.append(step)

  def _raise_save_error(self, step: int, nbytes: int, error: Exception):
    """Raises CheckpointSaveError for a failed save of `step` after making the manager list
    what is on disk; re-raises `error` as it is when it is not a storage failure (a bug
    keeps its traceback). The half-written `<step>.orbax-checkpoint-tmp` is left to orbax:
    writes of it may still be running, it is never listed, and the next writable manager
    deletes it when it opens the directory."""
    self._pending = None
    if not is_storage_error(error):
      raise error
    self._failed = True
    try:
      self.manager.reload()
      previous = self.manager.latest_step()
    except Exception:  # pylint: disable=broad-except  # the message matters more
      previous = None
    raise CheckpointSaveError(
        _save_error_message(self.directory, step, nbytes, error, previous)) from error

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


# ----------------------------------------------------------------------------- save failures

_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."
_READ_ONLY_WARNING = "Given directory is read only=%s"


def _save_error_message(directory: str, step: int, nbytes: int, error: BaseException,
                        previous: int | None) -> str:
  """One line: step, where, why, the size needed, what a rerun resumes from, what to do."""
  code, why = storage_error_reason(error)
  try:
    free = f", {format_bytes(shutil.disk_usage(directory).free)} free there"
  except OSError:
    free = ""
  if previous is None:
    resume = "there is no previous checkpoint, so a rerun starts from scratch"
  else:
    where = os.path.join(directory, str(previous))
    resume = (f"the previous checkpoint, step {previous} ({where}), is intact and a rerun "
              "resumes from it")
  fix = "free up space there" if code in (errno.ENOSPC, errno.EDQUOT) else "fix that"
  return (f"saving checkpoint step {step} in {directory} failed: {why} (the checkpoint needs "
          f"about {format_bytes(nbytes)}{free}); {resume}; {fix} or use another --workdir, "
          "then rerun")
