"""Resuming from the newest intact training checkpoint; damaged ones are set aside.

A step directory CHECKPOINTS/<step> is intact when it is committed and every file of it
reads back. Orbax marks a commit with a commit time in `_CHECKPOINT_METADATA` (all
versions) and `commit_success.txt` (orbax >= 0.12, also on local disks), written just
before it renames `<step>.orbax-checkpoint-tmp` to `<step>` (local disks) or last (object
stores). A step is damaged when it has neither marker, when one of its JSON files does
not parse, or when reading its arrays fails (truncated, missing or garbled files).

`find_resume_point` tries the steps newest first, restoring each in full, and resumes
from the first that restores. The damaged newer steps, and older ones whose files are
incomplete, are renamed to `<step>.damaged` (kept as evidence: orbax neither lists,
restores, overwrites nor prunes such a directory, and a new save of that step writes a
fresh `<step>`). When no step is intact it raises CheckpointDamagedError and changes
nothing. Unfinished `<step>.orbax-checkpoint-tmp` saves are left to orbax, which deletes
them when the run opens its manager (a save of that step could not start otherwise).

Multi-process runs: every process reads the shared directory and restores its shards
without orbax's barriers; the processes then agree (an all-gather) that a step restored
everywhere before any of them uses it, so they all fall back, or resume, together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from jax.experimental import multihost_utils

from strip_mlp.checkpoints import storage_errors
from strip_mlp.errors import CheckpointDamagedError, CheckpointMismatchError, UserError

STATE, META, METRICS = "state", "meta", "metrics"  # the items of a step (train_checkpoint)
COMMIT_FILE = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
TMP_MARK = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
# What reading a damaged step raises: tensorstore's status errors and json's are
# ValueErrors, missing files OSErrors, a missing item a KeyError from orbax.
READ_ERRORS = (ValueError, OSError, KeyError, TypeError, EOFError)
_STATUS_WORDS = {
    "OUT_OF_RANGE": "truncated",
    "NOT_FOUND": "missing",
    "DATA_LOSS": "corrupt",
    "FAILED_PRECONDITION": "unreadable",
    "INVALID_ARGUMENT": "unreadable",
}


@dataclasses.dataclass
class ResumePoint:
  """Where a run starts: `step` None = from scratch. `warning`: one line, or None."""

  step: int | None = None
  state: Any = None
  meta: dict | None = None
  warning: str | None = None


def list_steps(directory: str) -> tuple[list[int], list[int]]:
  """(steps of the committed-looking `<step>` directories, steps of unfinished
  `<step>.orbax-checkpoint-tmp*` saves), both ascending; ([], []) without a directory.
  Local or remote (gs://...) paths."""
  root = epath.Path(directory)
  if not root.is_dir():
    return [], []
  names = [p.name for p in root.iterdir()]
  steps = [int(n) for n in names if n.isdigit() and (root / n).is_dir()]
  unfinished = {int(n.split(".")[0]) for n in names if TMP_MARK in n and n.split(".")[0].isdigit()}
  return sorted(steps), sorted(unfinished)


def file_problem(step_dir: str) -> str | None:
  """Why the files of `step_dir` are not a committed checkpoint (a few words), from its
  markers and small JSON files alone; None when they look complete. Reads no arrays."""
  root = epath.Path(step_dir)
  committed = (root / COMMIT_FILE).exists()
  if (root / STEP_METADATA).exists():
    try:
      step_metadata = json.loads((root / STEP_METADATA).read_text())
    except ValueError:
      step_metadata = None
    if not isinstance(step_metadata, dict):
      return f"{STEP_METADATA} is not valid JSON (truncated or garbled)"
    committed = committed or bool(step_metadata.get("commit_timestamp_nsecs"))
  if not committed:
    return f"it has no commit marker ({COMMIT_FILE}): its save, or a copy of it, did not finish"
  for item in (STATE, META):
    if not (root / item).is_dir():
      return f"{item}/ is missing"
  for rel in (f"{META}/metadata", f"{STATE}/_METADATA", f"{METRICS}/{METRICS}"):
    if rel.startswith(METRICS) and not (root / METRICS).is_dir():
      continue  # saved without eval metrics
    if not (root / rel).exists():
      return f"{rel} is missing"
    try:
      json.loads((root / rel).read_text())
    except ValueError:
      return f"{rel} is not valid JSON (truncated or garbled)"
  return None


def describe_read_error(error: BaseException, root: str) -> str:
  """A few words for an error reading the checkpoint at `root`: the file (relative to
  `root`) and what is wrong with it, without tensorstore's spec dump."""
  text = " ".join(str(error).split()).split(" [tensorstore_spec")[0]
  if isinstance(error, json.JSONDecodeError):
    return f"a JSON file is not valid JSON ({error.msg})"
  files = re.findall(r'local file "([^"]+)"', text)
  if isinstance(error, FileNotFoundError) and getattr(error, "filename", None):
    files.append(str(error.filename))
  status = re.match(r"([A-Z_]+): ", text)
  detail = text.rsplit(": ", 1)[-1][:160]
  short = re.search(r"byte range \[\d+, (\d+)\) is not valid for value of size (\d+)", text)
  if short:
    detail = f"{short[2]} bytes, {short[1]} needed"
  if files:
    rel = os.path.relpath(files[-1], root)
    word = _STATUS_WORDS.get(status[1], "unreadable") if status else "missing"
    if isinstance(error, KeyError):
      word = "unreadable"
    return f"{rel} is {word} ({detail})"
  if isinstance(error, KeyError):
    return f"an item is missing ({detail.strip(chr(34))})"
  return detail or type(error).__name__


def all_agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.array([0 if ok else 1], np.int32))
  return not np.any(flags)


def read_step(step_dir: str, target: Any, check=None) -> tuple[Any, dict]:
  """(state, meta) of the step in `step_dir`, restored onto `target` (a pytree of
  ShapeDtypeStructs with the shardings wanted) without orbax's cross-process barriers.
  `check(step_dir, meta, state_tree_metadata)` runs before the arrays are read (e.g. raises
  CheckpointMismatchError). Raises what the reads raise (READ_ERRORS when damaged)."""
  storage_errors.quiet_closed_event_loop_errors()  # left by the reads of a failed restore
  root = epath.Path(step_dir)
  meta = dict(ocp.JsonCheckpointHandler().restore(root / META))
  handler = ocp.StandardCheckpointHandler()
  try:
    if check is not None:
      tree = handler.metadata(root / STATE)
      check(step_dir, meta, getattr(tree, "tree", tree))
    restored = handler.restore(
        root / STATE, args=ocp.args.StandardRestore(serialization.to_state_dict(target))
    )
  finally:
    handler.close()
  return serialization.from_state_dict(target, restored), meta


def find_resume_point(directory: str, target: Any, check=None) -> ResumePoint:
  """The newest step of `directory` that restores in full onto `target` (see read_step),
  with a one-line warning naming the newer damaged steps and where they were moved.

  Raises CheckpointDamagedError (one line, nothing changed) when steps exist and none is
  intact, CheckpointMismatchError when `check` refuses the step tried. Collective: every
  process calls it with the same directory.
  """
  steps, unfinished = list_steps(directory)
  problems = {s: file_problem(os.path.join(directory, str(s))) for s in steps}
  damaged: list[tuple[int, str]] = []
  for step in reversed(steps):
    step_dir = os.path.join(directory, str(step))
    state = meta = mismatch = None
    reason = problems[step]
    if reason is None:
      try:
        state, meta = read_step(step_dir, target, check)
      except CheckpointMismatchError as e:
        mismatch = e
      except READ_ERRORS as e:
        if isinstance(e, UserError):
          raise
        reason = describe_read_error(e, step_dir)
    if not all_agree(mismatch is None):
      raise mismatch or CheckpointMismatchError(
          f"checkpoint {step_dir} does not fit the model being trained (see process 0)"
      )
    if all_agree(reason is None):
      # Older steps whose files are incomplete go too: orbax cannot open a directory
      # with a garbled metrics file, and would later restore or prune them.
      damaged += [(s, problems[s]) for s in reversed(steps) if s < step and problems[s]]
      moved = _set_aside(directory, damaged)
      return ResumePoint(step, state, meta, _warning(damaged, moved, step, unfinished))
    damaged.append((step, reason or "unreadable on another process"))
  if damaged:
    raise CheckpointDamagedError(_none_intact_message(directory, damaged))
  return ResumePoint(warning=_warning([], [], None, unfinished))


def _set_aside(directory: str, damaged: list[tuple[int, str]]) -> list[str]:
  """Renames each damaged `<step>` to `<step>.damaged` (`.damaged-2`, ... when taken) on
  process 0; returns the new paths. All processes return once the renames are done."""
  if not damaged:
    return []
  root, moved = epath.Path(directory), []
  for step, _ in damaged:
    name, k = f"{step}{DAMAGED_SUFFIX}", 1
    while (root / name).exists():
      k += 1
      name = f"{step}{DAMAGED_SUFFIX}-{k}"
    moved.append(os.path.join(directory, name))
  all_agree(True)  # every process has its names before process 0 renames
  error = None
  if jax.process_index() == 0:
    for (step, _), new in zip(damaged, moved):
      try:
        (root / str(step)).rename(new)
      except OSError as e:
        error = f"cannot rename {root / str(step)} to {new}: {e.strerror or e}"
        break
  if not all_agree(error is None):
    raise CheckpointDamagedError(
        f"{error or 'setting a damaged checkpoint aside failed on process 0'}; move it out of "
        f"{directory} yourself, then rerun"
    )
  return moved


def _steps_text(damaged: list[tuple[int, str]]) -> str:
  return "; ".join(f"step {s}: {why}" for s, why in damaged)


def _warning(damaged, moved, step, unfinished) -> str | None:
  """One line: the damaged steps and where they are kept, unfinished saves newer than
  `step`, and where the run starts."""
  clauses = []
  if len(damaged) == 1:
    clauses.append(
        f"checkpoint step {damaged[0][0]} is damaged ({damaged[0][1]}); kept it as "
        f"{moved[0]} for inspection (delete it when done)"
    )
  elif damaged:
    clauses.append(
        f"checkpoints damaged ({_steps_text(damaged)}); kept them as {', '.join(moved)} for "
        "inspection (delete them when done)"
    )
  late = [u for u in unfinished if step is None or u > step]
  if late:
    clauses.append(
        f"the save of step {', '.join(map(str, late))} did not finish (its partial "
        f"{TMP_MARK} files are deleted)"
    )
  if not clauses:
    return None
  start = "starting from scratch" if step is None else f"resuming from step {step}"
  return (
      "warning: "
      + "; ".join(clauses)
      + f"; {start}"
      + (", the newest intact one" if damaged else "")
  )


def _none_intact_message(directory: str, damaged: list[tuple[int, str]]) -> str:
  return (
      f"no intact checkpoint in {directory} ({_steps_text(damaged)}); nothing was changed. "
      "Restore the files from a copy, or move that folder aside (or use another --workdir) "
      "to start from scratch"
  )


def eval_message(directory: str, step: int | None, why: str) -> str:
  """eval.py's line for damaged step `step` of `directory` (None: the newest step whose
  files are not complete, else the newest; `why` is then the fallback reason): which step,
  why, and what to evaluate instead."""
  steps, _ = list_steps(directory)
  if step is None:
    problems = {s: file_problem(os.path.join(directory, str(s))) for s in steps}
    bad = [s for s in steps if problems[s]] or steps[-1:] or [-1]
    step, why = bad[-1], problems.get(bad[-1]) or why
  others = ", ".join(str(s) for s in steps if s != step)
  instead = f"evaluate another step with --step (steps: {others}), or " if others else ""
  return (
      f"checkpoint step {step} in {directory} is damaged ({why}); {instead}rerun train.py "
      "on the workdir: it resumes from the newest intact checkpoint"
  )
