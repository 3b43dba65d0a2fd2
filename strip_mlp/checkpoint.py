"""Model checkpoints on disk: an orbax tree of variables with the model's config beside it.

    DIR/config.json     {"format": "strip_mlp.model/1", "model": StripMLP keywords}
    DIR/variables/      orbax StandardCheckpointer tree {'params', 'batch_stats'}

Written by `convert_torch_weights.py` (or `save_checkpoint`), read by `load_checkpoint`.
A checkpoint is staged in a temporary sibling directory and renamed into place, so a
crash never leaves a half-written DIR.

Fine-tuning (train.py --config.init_from): `load_pretrained` reads such a directory or a
.pth file, `merge_pretrained` fits it to the model being trained.

Write failures (shared with the training checkpoints of checkpointing.py): a storage
error (`is_storage_error`: disk full, permissions, tensorstore's I/O errors) is raised as
one line saying why (`storage_error_reason`); `StorageNoiseFilter` keeps orbax's and
asyncio's tracebacks of it out of the log.
"""
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from strip_mlp.errors import UserError
from strip_mlp.model import StripMLP

FORMAT = "strip_mlp.model/1"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
HEAD = "head"  # name of the classifier in the model's params


class CheckpointMismatchError(UserError, ValueError):
  """A stored checkpoint does not fit the model/optimizer being trained."""


class CheckpointWriteError(UserError, OSError):
  """`save_checkpoint` cannot write its output (exists, unwritable, disk full)."""


def save_checkpoint(directory: str, model: StripMLP, variables) -> str:
  """Writes `variables` of `model` to a new `directory` (single process). Returns its path.

  Refuses to overwrite anything but an empty directory. Raises CheckpointWriteError (one
  line) when DIR exists or cannot be written; no partial DIR or staging directory is left.
  """
  directory = os.path.abspath(directory)
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise CheckpointWriteError(f"{directory} already exists and is not a directory; choose a "
                               "new output directory (existing files are never overwritten)")
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointWriteError(f"{directory} already exists and is not empty; "
                               "choose a new output directory or delete it first")
  parent = os.path.dirname(directory)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
  except OSError as e:
    raise CheckpointWriteError(f"cannot write to {parent}: {e.strerror}; choose a writable "
                               "output directory") from None
  noise = StorageNoiseFilter(staging).attach()
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      json.dump({"format": FORMAT, "model": model.config_dict()}, f, indent=2)
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.rename(staging, directory)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, Exception) and is_storage_error(e):  # `noise` stays: late asyncio logs
      raise CheckpointWriteError(
          f"cannot write {directory}: {storage_error_reason(e)[1]} (the weights need about "
          f"{format_bytes(tree_nbytes(variables))}); nothing was written: free up space or "
          "choose another output directory") from e
    noise.detach()
    raise
  noise.detach()
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
  from strip_mlp.model import abstract_variables  # pylint: disable=g-import-not-at-top
  model = StripMLP(**{**read_model_config(directory), **model_overrides})
  # Restored onto this process's first device, also when several processes run.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      abstract_variables(model))
  variables = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), VARIABLES_DIR), target)
  return model, variables


# ----------------------------------------------------------------------------- fine-tuning

def load_pretrained(path: str) -> tuple[dict, dict]:
  """(model keywords, {'params', 'batch_stats'} as numpy) of pretrained weights at `path`:
  a directory written by `convert_torch_weights.py`/`strip_mlp.save_checkpoint`, or a
  PyTorch .pth file (converted on the fly; needs torch)."""
  if os.path.isdir(path):
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


# ----------------------------------------------------------------------------- storage errors

_STORAGE_ERROR = re.compile(r"os_error_code|RESOURCE_EXHAUSTED|PERMISSION_DENIED|No space left|"
                            r"Disk quota|Read-only file system|Permission denied")


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
  return sum(int(x.nbytes) if hasattr(x, "nbytes") else np.asarray(x).nbytes
             for x in jax.tree_util.tree_leaves(tree))


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
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and "call_soon_threadsafe" in frames):
      previous(unraisable)
  hook.strip_mlp_closed_loop = True
  sys.unraisablehook = hook
