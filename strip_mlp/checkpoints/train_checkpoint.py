"""Training checkpoints: the workdir layout, an orbax CheckpointManager with resume and
keep-last/keep-best, and the choice of a step to read (latest, best, given).

Layout: WORKDIR/config.json (the resolved config), WORKDIR/metrics.jsonl,
        WORKDIR/checkpoints/<step>/{state, meta}
  state: the whole train state as a nested dict (flax.serialization.to_state_dict):
         step, params, batch_stats, opt_state, ema
  meta:  JSON: step (= data position for the input pipeline), epoch, best eval top-1,
         the model's constructor keywords, process/device counts at save time.

Orbax writes every checkpoint into a temporary directory and renames it only when all
processes have finished writing (plus a commit marker on object stores), so a crash
mid-save leaves no directory that `latest_step` would return; leftovers are deleted when
the next manager opens the directory. Arrays are stored per shard with their global shape,
so a checkpoint restores onto any number of devices/processes: pass targets that carry the
new shardings. A run resumes from the newest step that reads back in full and sets damaged
ones aside (checkpoint_recovery); eval.py names a damaged step in one line.

A save that fails (disk full, permissions) raises CheckpointSaveError, one line, from
whichever call first sees it (save, newly_committed, wait or close); the previous
checkpoint stays the latest and its temporary directory is deleted on the next open.
`newly_committed()` and `wait()` name the steps whose files are committed, so "saved" is
announced only then. Orbax's warnings about expected situations (read-only opening, saves
without metrics) and its tracebacks of a failed save are not logged.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from orbax.checkpoint import checkpoint_managers as ocm

from strip_mlp.checkpoints import checkpoint_recovery
from strip_mlp.errors import CheckpointMismatchError, CheckpointSaveError, EvalError
from strip_mlp.models.strip_mlp import ARCHITECTURE_KEYS
from strip_mlp.checkpoints.storage_errors import (
    StorageNoiseFilter,
    is_storage_error,
    save_error_message,
    tree_nbytes,
)
from strip_mlp.checkpoints.tree_diff import describe_mismatch, shape_map

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE = checkpoint_recovery.STATE
META = checkpoint_recovery.META


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

  def __init__(
      self,
      directory: str,
      *,
      keep: int = 3,
      keep_best: bool = True,
      async_save: bool = True,
      read_only: bool = False,
  ):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self._async = async_save and not read_only
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight
    self._committed: list[int] = []  # finished, not reported yet
    self._failed = False  # a CheckpointSaveError was raised
    self._closed = False
    best = dict(best_fn=lambda m: m["top1"], best_mode="max")  # also makes orbax store metrics
    if read_only:  # save_interval_steps=0: orbax would warn that it sets it so
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0, **best
      )
    else:
      policies = [ocm.LatestN(n=keep)]
      if keep_best:
        policies.append(
            ocm.BestN(
                get_metric_fn=lambda m: m["top1"], n=1, keep_checkpoints_without_metrics=False
            )
        )
      options = ocp.CheckpointManagerOptions(
          create=True,
          cleanup_tmp_directories=True,
          enable_async_checkpointing=async_save,
          preservation_policy=ocm.AnyPreservationPolicy(policies=policies),
          **best,
      )
    self._filter = StorageNoiseFilter(self.directory).attach()
    self._filter.messages.update(_DAMAGED_STEP_NOTES)  # a damaged step is reported as one
    try:
      with self._filter.quiet(_READ_ONLY_WARNING if read_only else None):
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )
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
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(serialization.to_state_dict(state)),
                    META: ocp.args.JsonSave(dict(meta, step=step)),
                }
            ),
            metrics=metrics,
            force=True,
        )
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
        save_error_message(self.directory, step, nbytes, error, previous)
    ) from error

  # --------------------------------------------------------------------------- restore
  def read_meta(self, step: int) -> dict:
    """The meta of checkpoint `step` (JSON; read without orbax's cross-process barrier)."""
    return dict(ocp.JsonCheckpointHandler().restore(epath.Path(self.directory) / str(step) / META))

  def check_compatible(self, step: int, target: Any, model_config: dict | None = None):
    """Raises CheckpointMismatchError (one line saying what to do) if checkpoint `step`
    does not fit `target` (the abstract train state)."""
    tree = self.manager.item_metadata(step)[STATE]
    check_fits(
        os.path.join(self.directory, str(step)),
        self.read_meta(step),
        getattr(tree, "tree", tree),
        target,
        model_config,
    )

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`; `target` is a pytree of ShapeDtypeStructs with
    the shardings wanted now (any device count), of the same structure as the saved state.
    Every process calls it; it has no barrier (checkpoint_recovery.read_step)."""
    return checkpoint_recovery.read_step(os.path.join(self.directory, str(step)), target)


def check_fits(where: str, meta: dict, tree: Any, target: Any, model_config: dict | None):
  """Raises CheckpointMismatchError (one line saying what to do) if the checkpoint at
  `where`, with `meta` and the stored state's tree metadata `tree`, does not fit `target`
  (the abstract train state) or was written for another model than `model_config`."""
  hint = (
      f"start a fresh --workdir, or train with the config that wrote it "
      f"({os.path.dirname(os.path.dirname(where))}/config.json)"
  )
  stored = meta.get("model") if model_config is not None else None
  if stored is not None:
    diff = {
        k: (stored.get(k), v)
        for k, v in model_config.items()
        if k in ARCHITECTURE_KEYS + ("family",) and _norm(stored.get(k)) != _norm(v)
    }
    if diff:
      desc = ", ".join(
          f"{k} {a!r} in the checkpoint vs {b!r} now" for k, (a, b) in sorted(diff.items())
      )
      raise CheckpointMismatchError(
          f"checkpoint {where} was written for a different model ({desc}); {hint}"
      )
  problem = describe_mismatch(
      shape_map(tree), shape_map(serialization.to_state_dict(target)), expected_in="now"
  )
  if problem:
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit the model/optimizer being trained: {problem}; {hint}"
    )


def is_step_dir(path: str) -> bool:
  """Whether `path` is one step directory of a training checkpoints/ directory."""
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, STATE)
  )


def select_step(checkpoints_dir: str, step: int | None, which: str) -> tuple[int, dict]:
  """(step, its meta) to read from `checkpoints_dir` (opened read-only): `step` if given,
  else the latest or the best (highest eval top-1). Raises EvalError (one line), also when
  that step is damaged (checkpoint_recovery.file_problem, an unreadable meta)."""
  try:
    ckpt = Checkpointer(checkpoints_dir, read_only=True)
  except checkpoint_recovery.READ_ERRORS as e:  # orbax reads the metrics of every step
    if isinstance(e, EvalError):
      raise
    raise EvalError(checkpoint_recovery.eval_message(checkpoints_dir, None, str(e))) from None
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise EvalError(f"no complete checkpoint in {checkpoints_dir} yet")
    if step is not None and step not in steps:
      raise EvalError(
          f"no checkpoint of step {step} in {checkpoints_dir}; available steps: "
          f"{', '.join(map(str, steps))}"
      )
    if step is None and which not in ("latest", "best"):
      raise EvalError(f"--which={which!r}: use 'latest' or 'best'")
    if step is None:
      step = steps[-1] if which == "latest" else _best_step(ckpt, steps)
    step = int(step)
    why = checkpoint_recovery.file_problem(os.path.join(checkpoints_dir, str(step)))
    if why is None:
      try:
        return step, ckpt.read_meta(step)
      except checkpoint_recovery.READ_ERRORS as e:
        why = checkpoint_recovery.describe_read_error(e, os.path.join(checkpoints_dir, str(step)))
    raise EvalError(checkpoint_recovery.eval_message(checkpoints_dir, step, why))
  finally:
    ckpt.close()


def _best_step(ckpt: Checkpointer, steps: list[int]) -> int:
  """The step of `steps` with the highest eval top-1: orbax stores metrics beside a
  checkpoint only when its manager tracks a best_fn; otherwise the eval rows train.py
  writes to metrics.jsonl decide."""
  has_metrics = any(os.path.isdir(os.path.join(ckpt.directory, str(s), "metrics")) for s in steps)
  best = ckpt.best_step() if has_metrics else None
  if best is None:
    best = _best_from_metrics_file(os.path.dirname(ckpt.directory), steps)
  if best is None:
    raise EvalError(
        f"no eval top-1 recorded for the checkpoints in {ckpt.directory}, so "
        "none is 'best'; use --which=latest or --step=N"
    )
  return int(best)


def _best_from_metrics_file(workdir: str, steps: list[int]) -> int | None:
  """Step (among `steps`) with the highest eval top-1 in WORKDIR/metrics.jsonl."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return None
  top1 = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line being written right now
      if row.get("kind") == "eval" and "top1" in row:
        top1[int(row["step"])] = float(row["top1"])  # the last evaluation of a step wins
  scored = [(top1[s], s) for s in steps if s in top1]
  return max(scored)[1] if scored else None


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."
_READ_ONLY_WARNING = "Given directory is read only=%s"
_DAMAGED_STEP_NOTES = (
    "Failed to json parse Metadata file: %s, file content: %s, error: %s",
    "Metadata file does not exist: %s",
)
