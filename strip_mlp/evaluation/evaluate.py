"""Evaluation over a whole split, on any number of devices and processes: the one
implementation behind eval.py and the evaluations during training.

    from strip_mlp.evaluation import evaluate
    from strip_mlp.checkpoints import model_checkpoint
    ckpt = model_checkpoint.load_weights("workdir_or_converted_dir", which="best", ema=True)
    metrics = evaluate.evaluate(ckpt.model, ckpt.variables, data_cfg, batch_size=256)
    # {'top1', 'top5', 'loss', 'count', 'images_per_sec', 'num_examples', ...}

The eval step is `steps.make_eval_step` (the masked loss/top-k sums), jitted with the
batch split over every device of a mesh and the variables replicated. Padded examples (mask 0) count for nothing. Each batch's sums are
exact in float32 (integer hit counts below 2**24); they are accumulated on the host as
Python ints (hits, count) and float64 (loss), so the result is the same on any device or
process count up to float32 rounding of the per-batch loss sums.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from strip_mlp.runtime import sharding as sharding_lib
from strip_mlp.train import steps
from strip_mlp.errors import EvalError
from strip_mlp.models.strip_mlp import ARCHITECTURE_KEYS, VARIANTS, StripMLP

MAX_EXACT_BATCH = 2**24  # float32 sums of 0/1 hits are exact below this


# ============================================================================ evaluation


def make_eval_fn(model: StripMLP, mesh: Mesh) -> Callable:
  """The jitted eval step of `steps.make_eval_step`: variables replicated, the batch
  ({'image', 'label', 'mask'}) split over every device of `mesh`, the sums replicated."""
  repl = sharding_lib.replicated(mesh)
  return jax.jit(
      steps.make_eval_step(model),
      in_shardings=(repl, sharding_lib.batch_sharding(mesh)),
      out_shardings=repl,
  )


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
  sums = [eval_fn(variables, batch) for batch in batches]  # dispatched asynchronously
  sums = jax.device_get(sums)
  seconds = time.perf_counter() - t0
  count = hits1 = hits5 = 0
  loss = 0.0
  for s in sums:  # float32 sums of 0/1 per batch are exact integers: round, add as ints
    count += int(round(float(s["count"])))
    hits1 += int(round(float(s["top1"])))
    hits5 += int(round(float(s["top5"])))
    loss += float(np.float64(s["loss"]))
  n = max(count, 1)
  return {
      "top1": hits1 / n,
      "top5": hits5 / n,
      "loss": loss / n,
      "count": count,
      "top1_hits": hits1,
      "top5_hits": hits5,
      "loss_sum": loss,
      "num_batches": len(sums),
      "seconds": seconds,
      "images_per_sec": count / seconds if seconds > 0 else float("nan"),
  }


def abstract_eval_batch(batch_size: int, data_cfg, batch_sharding, mask: bool = True) -> dict:
  """ShapeDtypeStructs of a batch {'image' (B, R, R, 3), 'label' (B,), 'mask' (B,)} with
  R = data_cfg.image_size; `mask=False`: a train batch, without 'mask'."""
  b, r = batch_size, int(data_cfg.image_size)
  dtype = jnp.bfloat16 if data_cfg.image_dtype == "bfloat16" else jnp.float32
  spec = {
      "image": jax.ShapeDtypeStruct((b, r, r, 3), dtype, sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding),
  }
  if mask:
    spec["mask"] = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sharding)
  return spec


def evaluate_split(
    eval_fn: Callable, variables: Any, data_cfg, batch_size: int, batch_sharding
) -> dict:
  """top1/top5 (fractions), mean loss and count of `eval_fn` over the eval split of
  `data_cfg` (training's periodic evaluation; the same accumulation as `evaluate`)."""
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)

  batches = pipeline.create_eval_iterator(data_cfg, batch_size, batch_sharding)
  result = evaluate_batches(eval_fn, variables, batches)
  return {k: result[k] for k in ("top1", "top5", "loss", "count")}


def check_model_fits_data(model, data_cfg, info, any_size: bool = False) -> None:
  """EvalError when the model's input size or class count differs from the data's.

  any_size: the model runs at the data's size whatever its img_size (Strip-MLP on
  windows); models without img_size take any size too.
  """
  size = int(data_cfg.image_size)
  trained = getattr(model, "img_size", size)
  if any_size:
    trained = size
  if trained == size and model.num_classes == info.num_classes:
    return
  fixes = []
  if model.img_size != size:
    fixes.append(f"--config.data.image_size={model.img_size} (the pipeline resizes the images)")
  if model.num_classes != info.num_classes:
    fixes.append(
        f"a dataset with {model.num_classes} classes (--config.data.name=... / "
        f"--config.data.source=...), or fine-tune the checkpoint on this one first "
        f"(train.py --config.init_from=CHECKPOINT)"
    )
  raise EvalError(
      f"the checkpoint is a {model.img_size}-px {model.num_classes}-class model but the data "
      f"({info.name}, split {info.eval_split!r}) is {size}-px with {info.num_classes} "
      f"classes; use {' and '.join(fixes)}"
  )


def check_batch_size(batch_size: int, num_devices: int, num_processes: int) -> None:
  if batch_size <= 0 or batch_size % num_devices or batch_size % num_processes:
    unit = math.lcm(num_devices, num_processes)
    suggestion = max(1, math.ceil(max(batch_size, 1) / unit)) * unit
    raise EvalError(
        f"batch size {batch_size} must be a positive multiple of the number of "
        f"devices ({num_devices}) and processes ({num_processes}); e.g. "
        f"--batch_size={suggestion}"
    )
  if batch_size > MAX_EXACT_BATCH:
    raise EvalError(f"batch size {batch_size} is too large (at most {MAX_EXACT_BATCH})")


def evaluate(
    model: StripMLP,
    variables: Any,
    data_cfg,
    batch_size: int,
    mesh: Mesh | None = None,
    any_size: bool = False,
) -> dict:
  """Top-1/top-5/loss of `model` with `variables` over the whole eval split of `data_cfg`.

  Args:
    model: a StripMLP (its img_size/num_classes must match the data).
    variables: {'params', 'batch_stats'}: host arrays or global arrays.
    data_cfg: an input-pipeline config (`strip_mlp.data.config.default_data_config()`, or a
      training config's `.data`); its `eval_split` (default: the dataset's) is evaluated.
    batch_size: global batch size, a multiple of the mesh's device count and of the
      process count; need not divide the split (the last batch is padded and masked).
    mesh: default: all devices of all processes (`sharding.create_mesh()`); a Mesh over
      fewer devices evaluates on those (every process must own some of them).
    any_size: run the model at the data's image size whatever its img_size (Strip-MLP on
      windows).
  Returns:
    {'top1', 'top5' (fractions), 'loss' (mean cross-entropy), 'count' (== the split size),
     'images_per_sec' (examples / wall time of the loop, compilation excluded),
     'num_examples', 'dataset', 'split', 'num_batches', 'seconds', 'compile_seconds',
     'num_devices', 'num_processes', 'batch_size', 'top1_hits', 'top5_hits', 'loss_sum'}.
  Raises:
    EvalError: model/data mismatch, bad batch size. RuntimeError if the count differs from
    the split size (a pipeline bug; never expected).
  """
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)

  mesh = sharding_lib.create_mesh() if mesh is None else mesh
  n_dev = int(mesh.devices.size)
  n_proc = jax.process_count()
  check_batch_size(batch_size, n_dev, n_proc)
  info = pipeline.get_dataset_info(data_cfg)
  check_model_fits_data(model, data_cfg, info, any_size)
  variables = place_variables(variables, mesh)
  eval_fn = make_eval_fn(model, mesh)

  batch_sharding = sharding_lib.batch_sharding(mesh)
  spec = abstract_eval_batch(batch_size, data_cfg, batch_sharding)
  t0 = time.perf_counter()
  compiled = eval_fn.lower(variables, spec).compile()
  compile_seconds = time.perf_counter() - t0

  batches = pipeline.create_eval_iterator(data_cfg, batch_size, batch_sharding)
  out = evaluate_batches(compiled, variables, batches)
  if out["count"] != info.num_eval:
    raise RuntimeError(
        f"evaluated {out['count']} examples but split {info.eval_split!r} of "
        f"{info.name} has {info.num_eval}"
    )
  out.update(
      num_examples=int(info.num_eval),
      dataset=info.name,
      split=info.eval_split,
      compile_seconds=compile_seconds,
      num_devices=n_dev,
      num_processes=n_proc,
      batch_size=int(batch_size),
  )
  return out


def check_config_model(model: StripMLP, config, config_name: str) -> None:
  """EvalError when an explicitly given training config describes another architecture
  than the checkpoint (the model is always read from the checkpoint)."""
  m = config.get("model") if hasattr(config, "get") else None
  if m is None:
    return
  want = dict(VARIANTS.get(m.get("variant") or "", {}))
  for k in ARCHITECTURE_KEYS:
    if m.get(k):
      want[k] = tuple(int(n) for n in m[k]) if k == "layers" else int(m[k])
  have = {
      k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in model.config_dict().items()
  }
  diff = {k: v for k, v in want.items() if have.get(k) != v}
  if diff:
    desc = ", ".join(
        f"{k}={have.get(k)!r} in the checkpoint vs {v!r} in {config_name}"
        for k, v in sorted(diff.items())
    )
    raise EvalError(
        f"the checkpoint does not match the config's model ({desc}); the model "
        "is read from the checkpoint: pass the config it was trained with, or "
        "leave --config out"
    )
