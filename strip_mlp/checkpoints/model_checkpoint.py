"""Model checkpoints: the weights of one model, from any path a user may give.

    DIR/config.json     {"format": "strip_mlp.model/1", "model": StripMLP keywords}
    DIR/variables/      orbax StandardCheckpointer tree {'params', 'batch_stats'}

`save_checkpoint` writes such a directory (staged in a temporary sibling and renamed into
place, so a crash never leaves a half-written DIR); `load_checkpoint` reads it.
`locate_checkpoint` is the one place that decides what a path names (a converted
directory, a PyTorch .pth file, a training workdir, its checkpoints/ directory or one step
directory); `load_weights` reads the model and {'params', 'batch_stats'} from any of them
straight onto the devices of a mesh (replicated); `strip_mlp.train.finetune` reads the same paths
for train.py --config.init_from. Every problem is a UserError with one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from strip_mlp.checkpoints import checkpoint_recovery, train_checkpoint
from strip_mlp.models import registry

from strip_mlp.errors import CheckpointWriteError, EvalError, NotACheckpointError
from strip_mlp.models.strip_mlp import StripMLP, abstract_variables
from strip_mlp.checkpoints.storage_errors import (
    StorageNoiseFilter,
    format_bytes,
    is_storage_error,
    quiet_closed_event_loop_errors,
    storage_error_reason,
    tree_nbytes,
)
from strip_mlp.checkpoints.tree_diff import describe_mismatch, shape_map

FORMAT = "strip_mlp.model/1"
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
WEIGHTS = ("params", "batch_stats")


def save_checkpoint(directory: str, model: StripMLP, variables) -> str:
  """Writes `variables` of `model` to a new `directory` (single process). Returns its path.

  Refuses to overwrite anything but an empty directory. Raises CheckpointWriteError (one
  line) when DIR exists or cannot be written; no partial DIR or staging directory is left.
  """
  directory = os.path.abspath(directory)
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise CheckpointWriteError(
        f"{directory} already exists and is not a directory; choose a "
        "new output directory (existing files are never overwritten)"
    )
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointWriteError(
        f"{directory} already exists and is not empty; "
        "choose a new output directory or delete it first"
    )
  parent = os.path.dirname(directory)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
  except OSError as e:
    raise CheckpointWriteError(
        f"cannot write to {parent}: {e.strerror}; choose a writable " "output directory"
    ) from None
  noise = StorageNoiseFilter(staging).attach()
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      json.dump({"format": FORMAT, "model": registry.model_config(model)}, f, indent=2)
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.rename(staging, directory)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, Exception) and is_storage_error(e):  # `noise` stays: late asyncio logs
      raise CheckpointWriteError(
          f"cannot write {directory}: {storage_error_reason(e)[1]} (the weights need about "
          f"{format_bytes(tree_nbytes(variables))}); nothing was written: free up space or "
          "choose another output directory"
      ) from e
    noise.detach()
    raise
  noise.detach()
  return directory


def read_model_config(directory: str) -> dict:
  """The StripMLP keywords stored in a checkpoint directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise NotACheckpointError(
        f"{directory} is not a Strip-MLP checkpoint (no {CONFIG_FILE}); create one with "
        "`python convert_torch_weights.py IN.pth OUT_DIR`"
    )
  meta = _read_json(path)
  if meta.get("format") != FORMAT:
    raise EvalError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta["model"]


def load_checkpoint(directory: str, **model_overrides):
  """Reads a checkpoint directory -> (StripMLP, variables).

  `model_overrides` change fields that do not alter the weights' shapes, e.g.
  dtype='bfloat16', drop_path_rate=0.2, depthwise_impl='xla'.
  """
  model = registry.model_from_config(read_model_config(directory), **model_overrides)
  # Restored onto this process's first device, also when several processes run.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_variables(model)
  )
  variables = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), VARIABLES_DIR), target
  )
  return model, variables


# ----------------------------------------------------------------------------- any path


@dataclasses.dataclass
class LoadedCheckpoint:
  """What `load_weights` read."""

  model: StripMLP
  variables: Any  # {'params', 'batch_stats'}
  kind: str  # 'converted' | 'pytorch' | 'workdir'
  path: str  # the converted dir / .pth / training workdir
  step: int | None = None  # training checkpoints only
  ema: bool = False
  train_config: dict | None = None  # the resolved config a training workdir saved

  def describe(self) -> str:
    m = self.model
    what = {
        "converted": "converted checkpoint",
        "pytorch": "PyTorch weights",
        "workdir": "training workdir",
    }[self.kind]
    if self.kind == "workdir":
      what += f", step {self.step}, {'EMA' if self.ema else 'raw'} weights"
    if isinstance(m, StripMLP):
      arch = f"embed_dim {m.embed_dim}, layers {','.join(map(str, m.layers))}"
    else:
      arch = type(m).__name__
    size = f"{m.img_size} px, " if hasattr(m, "img_size") else ""
    return (
        f"{self.path} ({what}; {arch}, {size}{m.num_classes} classes, "
        f"{jnp.dtype(m.dtype).name})"
    )


def locate_checkpoint(path: str) -> tuple[str, str, int | None]:
  """(kind, root, step) of what `path` names: ('converted', dir, None), ('pytorch', file,
  None) or ('workdir', checkpoints_dir, step of a step directory or None)."""
  checkpoints = train_checkpoint.CHECKPOINT_DIR
  if not path:
    raise EvalError("give the checkpoint to evaluate: --checkpoint=DIR")
  if not os.path.exists(path):
    raise EvalError(f"checkpoint {path} does not exist")
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if path.endswith((".pth", ".pt", ".bin")):
      return "pytorch", path, None
    raise EvalError(
        f"{path} is a file, not a checkpoint: give a converted checkpoint "
        "directory, a training workdir or a PyTorch .pth file"
    )
  if os.path.isdir(os.path.join(path, checkpoints)):
    return "workdir", os.path.join(path, checkpoints), None
  if train_checkpoint.is_step_dir(path):
    return "workdir", os.path.dirname(path), int(os.path.basename(path))
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    meta = _read_json(os.path.join(path, CONFIG_FILE))
    if "format" in meta:
      return "converted", path, None
    if "config" in meta:
      raise EvalError(
          f"training workdir {path} has no checkpoints yet ({checkpoints}/ "
          "is missing); train longer or point --checkpoint at another run"
      )
  if any(train_checkpoint.is_step_dir(os.path.join(path, d)) for d in os.listdir(path)):
    return "workdir", path, None
  raise EvalError(
      f"{path} is not a checkpoint: expected a converted checkpoint (config.json "
      "+ variables/, from convert_torch_weights.py) or a training workdir "
      f"({checkpoints}/<step>/, from train.py)"
  )


def load_weights(
    path: str,
    *,
    step: int | None = None,
    which: str | None = None,
    ema: bool | None = None,
    dtype: str | None = None,
    mesh: Mesh | None = None,
) -> LoadedCheckpoint:
  """Reads the model and its {'params', 'batch_stats'} from any checkpoint path.

  Args:
    path: converted checkpoint dir, PyTorch .pth, training workdir, its checkpoints/ dir or
      one step dir.
    step / which: training workdirs: this step, else 'latest' (default) or 'best' (highest
      eval top-1 recorded by train.py among the kept checkpoints).
    ema: training workdirs: the EMA weights instead of the raw ones.
    dtype: compute dtype override ('float32' | 'bfloat16'); parameters stay float32.
    mesh: where the arrays are restored (replicated); default all devices.
  Raises:
    EvalError with one line: missing path, not a checkpoint, unknown step, no EMA, shapes
    that do not match the stored model config, flags that do not apply.
  """
  if dtype is not None and dtype not in ("float32", "bfloat16"):
    raise EvalError(f"--dtype={dtype!r}: use 'float32' or 'bfloat16'")
  if step is not None and which == "best":
    raise EvalError("give either --step=N or --which=best, not both")
  kind, root, step_in_path = locate_checkpoint(path)
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()).reshape(-1), ("data",))
  if kind == "workdir":
    if step is not None and step_in_path is not None and step != step_in_path:
      raise EvalError(f"--step={step} contradicts the step directory {path}")
    step = step if step is not None else step_in_path
    return _load_workdir(root, step, which or "latest", bool(ema), dtype, mesh)
  if step is not None or which not in (None, "latest") or ema:
    raise EvalError(
        f"{root} holds one set of weights ({kind}); --step, --which=best and "
        "--ema apply to training workdirs only"
    )
  if kind == "pytorch":
    try:
      model, variables = registry.torch_to_flax(root)
    except (ImportError, ValueError, OSError) as e:
      raise EvalError(f"cannot read PyTorch weights {root}: {e}") from None
    if dtype is not None:
      model = model.clone(dtype=dtype)
    return LoadedCheckpoint(model, dict(variables), "pytorch", root)
  model = _model(read_model_config(root), root, dtype=dtype)
  if not os.path.isdir(os.path.join(root, VARIABLES_DIR)):
    raise EvalError(f"{root} is not a complete checkpoint: {VARIABLES_DIR}/ is missing")
  abstract = dict(abstract_variables(model))
  variables = restore_onto(
      os.path.join(root, VARIABLES_DIR),
      abstract,
      mesh,
      None,
      root,
      "the checkpoint is damaged; convert the .pth file again",
      lambda why: f"checkpoint {root} is damaged ({why}); convert the .pth file again",
  )
  return LoadedCheckpoint(model, variables, "converted", root)


def _load_workdir(
    checkpoints_dir: str, step: int | None, which: str, ema: bool, dtype: str | None, mesh: Mesh
) -> LoadedCheckpoint:
  workdir = os.path.dirname(checkpoints_dir)
  step, meta = train_checkpoint.select_step(checkpoints_dir, step, which)
  where = os.path.join(checkpoints_dir, str(step))
  if "model" not in meta:
    raise EvalError(
        f"checkpoint {where} does not record its model (no 'model' in "
        f"{train_checkpoint.META}); it was not written by train.py"
    )
  model = _model(meta["model"], where, dtype=dtype)
  state_dir = os.path.join(where, train_checkpoint.STATE)
  damaged = lambda why: checkpoint_recovery.eval_message(checkpoints_dir, step, why)
  if ema and not _tree_metadata(state_dir, damaged).get("ema"):
    raise EvalError(
        f"checkpoint {where} has no EMA weights (trained with ema_decay=0); "
        "evaluate the raw weights: drop --ema"
    )
  abstract = {k: v for k, v in abstract_variables(model).items() if k in WEIGHTS}
  variables = restore_onto(
      state_dir,
      abstract,
      mesh,
      "ema" if ema else None,
      where,
      "the checkpoint is damaged or was written by another version of train.py",
      damaged,
  )
  cfg_path = os.path.join(workdir, train_checkpoint.CONFIG_FILE)
  train_config = _read_json(cfg_path).get("config") if os.path.isfile(cfg_path) else None
  return LoadedCheckpoint(model, variables, "workdir", workdir, step, ema, train_config)


def restore_onto(
    directory: str,
    abstract: dict,
    mesh: Mesh,
    key: str | None,
    where: str,
    hint: str,
    damaged: Callable[[str], str],
) -> dict:
  """{'params', 'batch_stats'} read from the orbax tree in `directory` (at `key` of it, or
  at its top) straight into arrays replicated over `mesh`; other entries (optimizer state,
  the other weights) are not read. Checks the stored shapes against `abstract` first
  (EvalError naming `where` and `hint`); files that cannot be read raise EvalError with
  `damaged(what is wrong, in a few words)`. Every process calls it (any topology: the
  shardings come from `mesh`, not from the checkpoint)."""
  stored = _tree_metadata(directory, damaged)
  stored = stored.get(key, {}) if key else stored
  problem = describe_mismatch(
      shape_map({k: stored.get(k, {}) for k in abstract}), shape_map(abstract)
  )
  if problem:
    raise EvalError(f"checkpoint {where} does not match its model config: {problem}; {hint}")
  repl = NamedSharding(mesh, PartitionSpec())
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract
  )
  if key:
    target = {key: target}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=repl), target)
  quiet_closed_event_loop_errors()  # left by the reads of a failed restore
  try:
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        directory,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
  except checkpoint_recovery.READ_ERRORS as e:
    why = checkpoint_recovery.describe_read_error(e, os.path.dirname(directory))
    raise EvalError(damaged(why)) from None
  variables = restored[key] if key else restored
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _tree_metadata(directory: str, damaged: Callable[[str], str]) -> dict:
  from etils import epath  # pylint: disable=g-import-not-at-top

  try:
    md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
  except checkpoint_recovery.READ_ERRORS as e:
    why = checkpoint_recovery.describe_read_error(e, os.path.dirname(directory))
    raise EvalError(damaged(why)) from None
  tree = getattr(md, "tree", md)
  return dict(tree) if tree is not None else {}


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise EvalError(f"cannot read {path}: {e}") from None


def _model(config: dict, where: str, **overrides):
  try:
    return registry.model_from_config(config, **overrides)
  except (TypeError, ValueError) as e:
    raise EvalError(f"checkpoint {where} has an invalid model config {config}: {e}") from None
