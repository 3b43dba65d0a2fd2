"""Evaluation of Strip-MLP checkpoints on any dataset the input pipeline reads, on any
number of devices and processes (the library behind `eval.py`).

    from strip_mlp import evaluate as ev
    ckpt = ev.load_for_eval("workdir_or_converted_dir", which="best", ema=True)
    metrics = ev.evaluate(ckpt.model, ckpt.variables, data_cfg, batch_size=256)
    # {'top1', 'top5', 'loss', 'count', 'images_per_sec', 'num_examples', ...}

The eval step is `train_lib.make_eval_step` (one implementation of the masked loss/top-k
sums, shared with training), jitted with the batch split over every device of a mesh and
the variables replicated. Padded examples (mask 0) count for nothing. Each batch's sums are
exact in float32 (integer hit counts below 2**24); they are accumulated on the host as
Python ints (hits, count) and float64 (loss), so the result is the same on any device or
process count up to float32 rounding of the per-batch loss sums.

Checkpoints read here (`load_for_eval`): a directory written by `convert_torch_weights.py`
(`config.json` + `variables/`), a PyTorch .pth file (converted in memory; needs torch), or a
training workdir of `train.py` (`config.json` + `checkpoints/<step>/{state,meta}`; also
`WORKDIR/checkpoints` or one step directory). Training checkpoints are opened read-only
(nothing in the workdir is created or cleaned up, so a running training job is safe) and
only `params`/`batch_stats` or `ema` are read (partial restore, straight into their
shardings). Every problem is an `EvalError` with one line that says what to do.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from strip_mlp import checkpointing
from strip_mlp import sharding as sharding_lib
from strip_mlp import train_lib
from strip_mlp.errors import UserError
from strip_mlp.model import VARIANTS, StripMLP

CHECKPOINT_DIR = train_lib.CHECKPOINT_DIR
WORKDIR_CONFIG = train_lib.CONFIG_FILE
METRICS_FILE = train_lib.METRICS_FILE
STATE, META = checkpointing.STATE, checkpointing.META  # items of a training checkpoint
MAX_EXACT_BATCH = 2 ** 24        # float32 sums of 0/1 hits are exact below this


class EvalError(UserError, ValueError):
  """A checkpoint/data/flag problem; the message is one line that says what to do."""


# ============================================================================ evaluation

def make_eval_fn(model: StripMLP, mesh: Mesh) -> Callable:
  """The jitted eval step of `train_lib.make_eval_step`: variables replicated, the batch
  ({'image', 'label', 'mask'}) split over every device of `mesh`, the sums replicated."""
  repl = sharding_lib.replicated(mesh)
  return jax.jit(train_lib.make_eval_step(model),
                 in_shardings=(repl, sharding_lib.batch_sharding(mesh)), out_shardings=repl)


def place_variables(variables: Any, mesh: Mesh) -> Any:
  """`variables` replicated on every device of `mesh` (global arrays on all processes).

  Host arrays (identical on every process) are copied; global arrays that already have a
  sharding on this mesh are kept.
  """
  repl = sharding_lib.replicated(mesh)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # a global array restored by orbax into its sharding already
    if isinstance(x, jax.Array) and x.sharding == repl:
      return x
    return sharding_lib.put_global(np.asarray(x), repl)
  return jax.tree_util.tree_map(one, variables)


def evaluate_batches(eval_fn: Callable, variables: Any, batches: Iterable[dict]) -> dict:
  """Runs `eval_fn(variables, batch)` over `batches` and accumulates exactly.

  Returns {'top1', 'top5', 'loss' (means over the unmasked examples), 'count',
  'top1_hits', 'top5_hits', 'loss_sum', 'num_batches', 'seconds', 'images_per_sec'}.
  """
  t0 = time.perf_counter()
  sums = [eval_fn(variables, batch) for batch in batches]   # dispatched asynchronously
  sums = jax.device_get(sums)
  seconds = time.perf_counter() - t0
  count = hits1 = hits5 = 0
  loss = 0.0
  for s in sums:   # float32 sums of 0/1 per batch are exact integers: round, add as ints
    count += int(round(float(s["count"])))
    hits1 += int(round(float(s["top1"])))
    hits5 += int(round(float(s["top5"])))
    loss += float(np.float64(s["loss"]))
  n = max(count, 1)
  return {"top1": hits1 / n, "top5": hits5 / n, "loss": loss / n, "count": count,
          "top1_hits": hits1, "top5_hits": hits5, "loss_sum": loss,
          "num_batches": len(sums), "seconds": seconds,
          "images_per_sec": count / seconds if seconds > 0 else float("nan")}


def check_model_fits_data(model: StripMLP, data_cfg, info) -> None:
  """EvalError when the model's input size or class count differs from the data's."""
  size = int(data_cfg.image_size)
  if model.img_size == size and model.num_classes == info.num_classes:
    return
  fixes = []
  if model.img_size != size:
    fixes.append(f"--config.data.image_size={model.img_size} (the pipeline resizes the images)")
  if model.num_classes != info.num_classes:
    fixes.append(f"a dataset with {model.num_classes} classes (--config.data.name=... / "
                 f"--config.data.source=...), or fine-tune the checkpoint on this one first "
                 f"(train.py --config.init_from=CHECKPOINT)")
  raise EvalError(
      f"the checkpoint is a {model.img_size}-px {model.num_classes}-class model but the data "
      f"({info.name}, split {info.eval_split!r}) is {size}-px with {info.num_classes} "
      f"classes; use {' and '.join(fixes)}")


def check_batch_size(batch_size: int, num_devices: int, num_processes: int) -> None:
  if batch_size <= 0 or batch_size % num_devices or batch_size % num_processes:
    unit = math.lcm(num_devices, num_processes)
    suggestion = max(1, math.ceil(max(batch_size, 1) / unit)) * unit
    raise EvalError(f"batch size {batch_size} must be a positive multiple of the number of "
                    f"devices ({num_devices}) and processes ({num_processes}); e.g. "
                    f"--batch_size={suggestion}")
  if batch_size > MAX_EXACT_BATCH:
    raise EvalError(f"batch size {batch_size} is too large (at most {MAX_EXACT_BATCH})")


def evaluate(model: StripMLP, variables: Any, data_cfg, batch_size: int,
             mesh: Mesh | None = None) -> dict:
  """Top-1/top-5/loss of `model` with `variables` over the whole eval split of `data_cfg`.

  Args:
    model: a StripMLP (its img_size/num_classes must match the data).
    variables: {'params', 'batch_stats'}: host arrays or global arrays.
    data_cfg: an input-pipeline config (`input_pipeline.default_data_config()`, or a
      training config's `.data`); its `eval_split` (default: the dataset's) is evaluated.
    batch_size: global batch size, a multiple of the mesh's device count and of the
      process count; need not divide the split (the last batch is padded and masked).
    mesh: default: all devices of all processes (`sharding.create_mesh()`); a Mesh over
      fewer devices evaluates on those (every process must own some of them).
  Returns:
    {'top1', 'top5' (fractions), 'loss' (mean cross-entropy), 'count' (== the split size),
     'images_per_sec' (examples / wall time of the loop, compilation excluded),
     'num_examples', 'dataset', 'split', 'num_batches', 'seconds', 'compile_seconds',
     'num_devices', 'num_processes', 'batch_size', 'top1_hits', 'top5_hits', 'loss_sum'}.
  Raises:
    EvalError: model/data mismatch, bad batch size. RuntimeError if the count differs from
    the split size (a pipeline bug; never expected).
  """
  from strip_mlp import input_pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  mesh = sharding_lib.create_mesh() if mesh is None else mesh
  n_dev = int(mesh.devices.size)
  n_proc = jax.process_count()
  check_batch_size(batch_size, n_dev, n_proc)
  info = input_pipeline.get_dataset_info(data_cfg)
  check_model_fits_data(model, data_cfg, info)
  variables = place_variables(variables, mesh)
  eval_fn = make_eval_fn(model, mesh)

  batch_sharding = sharding_lib.batch_sharding(mesh)
  spec = train_lib.abstract_eval_batch(batch_size, data_cfg, batch_sharding)
  t0 = time.perf_counter()
  compiled = eval_fn.lower(variables, spec).compile()
  compile_seconds = time.perf_counter() - t0

  batches = input_pipeline.create_eval_iterator(data_cfg, batch_size, batch_sharding)
  out = evaluate_batches(compiled, variables, batches)
  if out["count"] != info.num_eval:
    raise RuntimeError(f"evaluated {out['count']} examples but split {info.eval_split!r} of "
                       f"{info.name} has {info.num_eval}")
  out.update(num_examples=int(info.num_eval), dataset=info.name, split=info.eval_split,
             compile_seconds=compile_seconds, num_devices=n_dev, num_processes=n_proc,
             batch_size=int(batch_size))
  return out


# ============================================================================ checkpoints

@dataclasses.dataclass
class LoadedCheckpoint:
  """What `load_for_eval` read."""
  model: StripMLP
  variables: Any            # {'params', 'batch_stats'}
  kind: str                 # 'converted' | 'pytorch' | 'workdir'
  path: str                 # the converted dir / .pth / training workdir
  step: int | None = None   # training checkpoints only
  ema: bool = False
  train_config: dict | None = None   # the resolved config a training workdir saved

  def describe(self) -> str:
    m = self.model
    what = {"converted": "converted checkpoint", "pytorch": "PyTorch weights",
            "workdir": "training workdir"}[self.kind]
    if self.kind == "workdir":
      what += f", step {self.step}, {'EMA' if self.ema else 'raw'} weights"
    return (f"{self.path} ({what}; embed_dim {m.embed_dim}, layers "
            f"{','.join(map(str, m.layers))}, {m.img_size} px, {m.num_classes} classes, "
            f"{jnp.dtype(m.dtype).name})")


def _is_step_dir(path: str) -> bool:
  return (os.path.basename(os.path.normpath(path)).isdigit()
          and os.path.isdir(os.path.join(path, STATE)))


def locate_checkpoint(path: str) -> tuple[str, str, int | None]:
  """(kind, root, step) of what `path` names: ('converted', dir, None), ('pytorch', file,
  None) or ('workdir', checkpoints_dir, step of a step directory or None)."""
  if not path:
    raise EvalError("give the checkpoint to evaluate: --checkpoint=DIR")
  if not os.path.exists(path):
    raise EvalError(f"checkpoint {path} does not exist")
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if path.endswith((".pth", ".pt", ".bin")):
      return "pytorch", path, None
    raise EvalError(f"{path} is a file, not a checkpoint: give a converted checkpoint "
                    "directory, a training workdir or a PyTorch .pth file")
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return "workdir", os.path.join(path, CHECKPOINT_DIR), None
  if _is_step_dir(path):
    return "workdir", os.path.dirname(path), int(os.path.basename(path))
  if os.path.isfile(os.path.join(path, WORKDIR_CONFIG)):
    meta = _read_json(os.path.join(path, WORKDIR_CONFIG))
    if "format" in meta:
      return "converted", path, None
    if "config" in meta:
      raise EvalError(f"training workdir {path} has no checkpoints yet ({CHECKPOINT_DIR}/ "
                      "is missing); train longer or point --checkpoint at another run")
  if any(_is_step_dir(os.path.join(path, d)) for d in os.listdir(path)):
    return "workdir", path, None
  raise EvalError(f"{path} is not a checkpoint: expected a converted checkpoint (config.json "
                  "+ variables/, from convert_torch_weights.py) or a training workdir "
                  f"({CHECKPOINT_DIR}/<step>/, from train.py)")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise EvalError(f"cannot read {path}: {e}") from None


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
        continue   # a line being written right now
      if row.get("kind") == "eval" and "top1" in row:
        top1[int(row["step"])] = float(row["top1"])   # the last evaluation of a step wins
  scored = [(top1[s], s) for s in steps if s in top1]
  return max(scored)[1] if scored else None


def select_step(ckpt: checkpointing.Checkpointer, step: int | None, which: str) -> int:
  """The checkpoint step to evaluate: `step` if given, else the latest or the best."""
  checkpoints_dir = ckpt.directory
  steps = ckpt.all_steps()
  if not steps:
    raise EvalError(f"no complete checkpoint in {checkpoints_dir} yet")
  if step is not None:
    if step not in steps:
      raise EvalError(f"no checkpoint of step {step} in {checkpoints_dir}; available steps: "
                      f"{', '.join(map(str, steps))}")
    return int(step)
  if which == "latest":
    return int(steps[-1])
  if which != "best":
    raise EvalError(f"--which={which!r}: use 'latest' or 'best'")
  # orbax stores metrics beside a checkpoint only when its manager tracks a best_fn;
  # otherwise the eval rows train.py writes to metrics.jsonl decide.
  has_metrics = any(os.path.isdir(os.path.join(checkpoints_dir, str(s), "metrics"))
                    for s in steps)
  best = ckpt.best_step() if has_metrics else None
  if best is None:
    best = _best_from_metrics_file(os.path.dirname(checkpoints_dir), steps)
  if best is None:
    raise EvalError(f"no eval top-1 recorded for the checkpoints in {checkpoints_dir}, so "
                    "none is 'best'; use --which=latest or --step=N")
  return int(best)


def _state_tree_metadata(state_dir: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  except (OSError, ValueError, FileNotFoundError) as e:
    raise EvalError(f"cannot read checkpoint {state_dir}: {e}") from None
  tree = getattr(md, "tree", md)
  return dict(tree) if tree is not None else {}


def _check_fits(stored: dict, abstract: dict, where: str, hint: str) -> None:
  problem = checkpointing.describe_mismatch(checkpointing.shape_map(stored),
                                           checkpointing.shape_map(abstract))
  if problem:
    raise EvalError(f"checkpoint {where} does not match its model config: {problem}; {hint}")


def _restore_replicated(directory: str, abstract: dict, mesh: Mesh, key: str | None = None
                        ) -> dict:
  """{'params', 'batch_stats'} read from the orbax tree in `directory` (at `key` of it, or
  at its top) straight into arrays replicated over `mesh`; other entries (optimizer state,
  the other weights) are not read. Every process calls it (works on any topology: the
  shardings come from `mesh`, not from the checkpoint)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  repl = sharding_lib.replicated(mesh)
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
  if key:
    target = {key: target}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=repl), target)
  restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      directory, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                             partial_restore=True))
  variables = restored[key] if key else restored
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _model(config: dict, where: str, **overrides) -> StripMLP:
  try:
    return StripMLP(**{**config, **{k: v for k, v in overrides.items() if v is not None}})
  except (TypeError, ValueError) as e:
    raise EvalError(f"checkpoint {where} has an invalid model config {config}: {e}") from None


def _load_workdir(checkpoints_dir: str, step: int | None, which: str, ema: bool,
                  dtype: str | None, mesh: Mesh) -> LoadedCheckpoint:
  from strip_mlp.model import abstract_variables  # pylint: disable=g-import-not-at-top
  workdir = os.path.dirname(checkpoints_dir)
  ckpt = checkpointing.Checkpointer(checkpoints_dir, read_only=True)
  try:
    step = select_step(ckpt, step, which)
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  where = os.path.join(checkpoints_dir, str(step))
  if "model" not in meta:
    raise EvalError(f"checkpoint {where} does not record its model (no 'model' in {META}); "
                    "it was not written by train.py")
  model = _model(meta["model"], where, dtype=dtype)
  stored = _state_tree_metadata(os.path.join(where, STATE))
  key = "ema" if ema else None
  if ema and not stored.get("ema"):
    raise EvalError(f"checkpoint {where} has no EMA weights (trained with ema_decay=0); "
                    "evaluate the raw weights: drop --ema")
  src = stored["ema"] if ema else {"params": stored.get("params", {}),
                                   "batch_stats": stored.get("batch_stats", {})}
  abstract = {k: v for k, v in abstract_variables(model).items()
              if k in ("params", "batch_stats")}
  _check_fits({k: src.get(k, {}) for k in abstract}, abstract, where,
              "the checkpoint is damaged or was written by another version of train.py")
  variables = _restore_replicated(os.path.join(where, STATE), abstract, mesh, key)
  cfg_path = os.path.join(workdir, WORKDIR_CONFIG)
  train_config = (_read_json(cfg_path).get("config") if os.path.isfile(cfg_path) else None)
  return LoadedCheckpoint(model, variables, "workdir", workdir, step, ema, train_config)


def load_for_eval(path: str, *, step: int | None = None, which: str | None = None,
                  ema: bool | None = None, dtype: str | None = None,
                  mesh: Mesh | None = None) -> LoadedCheckpoint:
  """Reads the model and variables to evaluate from `path`.

  Args:
    path: converted checkpoint dir, PyTorch .pth, training workdir, its checkpoints/ dir or
      one step dir.
    step / which: training workdirs: this step, else 'latest' (default) or 'best' (highest
      eval top-1 recorded by train.py among the kept checkpoints).
    ema: training workdirs: the EMA weights instead of the raw ones.
    dtype: compute dtype override ('float32' | 'bfloat16'); parameters stay float32.
    mesh: where training-checkpoint arrays are restored (replicated); default all devices.
  Raises:
    EvalError with one line: missing path, not a checkpoint, unknown step, no EMA, shapes
    that do not match the stored model config, flags that do not apply.
  """
  if dtype is not None and dtype not in ("float32", "bfloat16"):
    raise EvalError(f"--dtype={dtype!r}: use 'float32' or 'bfloat16'")
  if step is not None and which == "best":
    raise EvalError("give either --step=N or --which=best, not both")
  kind, root, step_in_path = locate_checkpoint(path)
  if kind == "workdir":
    if step is not None and step_in_path is not None and step != step_in_path:
      raise EvalError(f"--step={step} contradicts the step directory {path}")
    step = step if step is not None else step_in_path
    mesh = sharding_lib.create_mesh() if mesh is None else mesh
    return _load_workdir(root, step, which or "latest", bool(ema), dtype, mesh)

  if step is not None or which not in (None, "latest") or ema:
    raise EvalError(f"{root} holds one set of weights ({kind}); --step, --which=best and "
                    "--ema apply to training workdirs only")
  if kind == "pytorch":
    try:
      from strip_mlp.convert import torch_to_flax  # pylint: disable=g-import-not-at-top
      model, variables = torch_to_flax(root)
    except (ImportError, ValueError, OSError) as e:
      raise EvalError(f"cannot read PyTorch weights {root}: {e}") from None
    if dtype is not None:
      model = model.clone(dtype=dtype)
    return LoadedCheckpoint(model, dict(variables), "pytorch", root)

  from strip_mlp.checkpoint import (  # pylint: disable=g-import-not-at-top
      VARIABLES_DIR, read_model_config)
  from strip_mlp.model import abstract_variables  # pylint: disable=g-import-not-at-top
  try:
    config = read_model_config(root)
  except (OSError, ValueError) as e:
    raise EvalError(str(e)) from None
  model = _model(config, root, dtype=dtype)
  if not os.path.isdir(os.path.join(root, VARIABLES_DIR)):
    raise EvalError(f"{root} is not a complete checkpoint: {VARIABLES_DIR}/ is missing")
  stored = _state_tree_metadata(os.path.join(root, VARIABLES_DIR))
  abstract = dict(abstract_variables(model))
  _check_fits(stored, abstract, root, "the checkpoint is damaged; convert the .pth file again")
  # Like strip_mlp.load_checkpoint, but with target shardings: restoring with the saved
  # (single-device) sharding fails on processes that do not own that device.
  mesh = sharding_lib.create_mesh() if mesh is None else mesh
  variables = _restore_replicated(os.path.join(root, VARIABLES_DIR), abstract, mesh)
  return LoadedCheckpoint(model, variables, "converted", root)


def check_config_model(model: StripMLP, config, config_name: str) -> None:
  """EvalError when an explicitly given training config describes another architecture
  than the checkpoint (the model is always read from the checkpoint)."""
  m = config.get("model") if hasattr(config, "get") else None
  if m is None:
    return
  want = dict(VARIANTS.get(m.get("variant") or "", {}))
  if m.get("embed_dim"):
    want["embed_dim"] = int(m["embed_dim"])
  if m.get("layers"):
    want["layers"] = tuple(int(n) for n in m["layers"])
  if m.get("img_size"):
    want["img_size"] = int(m["img_size"])
  if m.get("num_classes"):
    want["num_classes"] = int(m["num_classes"])
  have = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
          for k, v in model.config_dict().items()}
  diff = {k: v for k, v in want.items() if have.get(k) != v}
  if diff:
    desc = ", ".join(f"{k}={have.get(k)!r} in the checkpoint vs {v!r} in {config_name}"
                     for k, v in sorted(diff.items()))
    raise EvalError(f"the checkpoint does not match the config's model ({desc}); the model "
                    "is read from the checkpoint: pass the config it was trained with, or "
                    "leave --config out")
