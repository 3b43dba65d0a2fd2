"""Failures to write checkpoints, as one line: what failed, why, what to do.

A storage error (`is_storage_error`: disk full, permissions, tensorstore's I/O errors) is
raised by the callers as one line (`storage_error_reason`, `save_error_message`);
`StorageNoiseFilter` keeps orbax's and asyncio's tracebacks of it out of the log.
"""

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import traceback

import jax
import numpy as np

_STORAGE_ERROR = re.compile(
    r"os_error_code|RESOURCE_EXHAUSTED|PERMISSION_DENIED|No space left|"
    r"Disk quota|Read-only file system|Permission denied"
)


def _causes(e: BaseException | None):
  """`e` and the exceptions it was raised from, once each."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def is_storage_error(e: BaseException) -> bool:
  """Whether `e` is a failure to write files: an OSError, or tensorstore's status error (a
  ValueError 'RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']')."""
  return any(isinstance(c, OSError) or _STORAGE_ERROR.search(str(c)) for c in _causes(e))


def storage_error_reason(e: BaseException) -> tuple[int | None, str]:
  """(errno or None, the cause in a few lower-case words or the error's first line)."""
  for c in _causes(e):
    code = c.errno if isinstance(c, OSError) else None
    m = re.search(r"os_error_code='?(\d+)", str(c))
    code = code or (int(m[1]) if m else None)
    if code:
      text = os.strerror(code)
      return code, text[:1].lower() + text[1:]
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return None, first[:200]


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
  i = 0
  while n >= 1024 and i < len(units) - 1:
    n, i = n / 1024, i + 1
  return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def tree_nbytes(tree) -> int:
  """Bytes of the leaves of `tree` (global size of sharded arrays)."""
  return sum(
      int(x.nbytes) if hasattr(x, "nbytes") else np.asarray(x).nbytes
      for x in jax.tree_util.tree_leaves(tree)
  )


class StorageNoiseFilter(logging.Filter):
  """Drops the log records a user cannot act on while checkpoints are written under
  `paths`: the tracebacks orbax (absl) and asyncio log for a write that failed there,
  which the caller raises as one line, and the expected warnings given to `quiet` (while
  it is active). `attach()` also silences the 'Event loop is closed' errors of such a
  failure (`quiet_closed_event_loop_errors`). After a failure, keep it attached: asyncio
  logs the failed writes' tasks when they are garbage-collected, possibly at exit."""

  _LOGGERS = ("absl", "asyncio")

  def __init__(self, *paths: str):
    super().__init__()
    self.paths = {p for path in paths for p in (path, os.path.realpath(path))}
    self.messages: set[str] = set()

  def attach(self) -> "StorageNoiseFilter":
    quiet_closed_event_loop_errors()
    for name in self._LOGGERS:
      logging.getLogger(name).addFilter(self)
    return self

  def detach(self) -> None:
    for name in self._LOGGERS:
      logging.getLogger(name).removeFilter(self)

  @contextlib.contextmanager
  def quiet(self, message: str | None):
    if message:
      self.messages.add(message)
    try:
      yield
    finally:
      self.messages.discard(message)

  def filter(self, record: logging.LogRecord) -> bool:
    if isinstance(record.msg, str) and record.msg in self.messages:
      return False
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None:
      return True
    text = f"{record.getMessage()} {exc}"
    return not (is_storage_error(exc) and any(p in text for p in self.paths))


def quiet_closed_event_loop_errors() -> None:
  """Silences the 'Event loop is closed' RuntimeErrors that tensorstore reports (through
  sys.unraisablehook, one per write) when the writes of a failed save finish after orbax
  closed their event loop; the failure itself is raised by the caller. Anything else goes
  to the hook installed before. Installs once per process."""
  previous = sys.unraisablehook
  if getattr(previous, "strip_mlp_closed_loop", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
    if not (
        isinstance(exc, RuntimeError)
        and str(exc) == "Event loop is closed"
        and "call_soon_threadsafe" in frames
    ):
      previous(unraisable)

  hook.strip_mlp_closed_loop = True
  sys.unraisablehook = hook


def save_error_message(
    directory: str, step: int, nbytes: int, error: BaseException, previous: int | None
) -> str:
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
    resume = (
        f"the previous checkpoint, step {previous} ({where}), is intact and a rerun "
        "resumes from it"
    )
  fix = "free up space there" if code in (errno.ENOSPC, errno.EDQUOT) else "fix that"
  return (
      f"saving checkpoint step {step} in {directory} failed: {why} (the checkpoint needs "
      f"about {format_bytes(nbytes)}{free}); {resume}; {fix} or use another --workdir, "
      "then rerun"
  )
