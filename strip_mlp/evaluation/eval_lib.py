"""What eval.py does once its flags are parsed: check, load, evaluate, report.

`run(flags, config, explicit_config)` evaluates a checkpoint (any path
`model_checkpoint.load_weights` reads) on the eval split of `config.data`, optionally at
another image size, prints one line and writes the results as JSON where they cannot be
lost (`write_results`). Every problem is a UserError with one line.
"""

import dataclasses
import json
import os

import jax

from strip_mlp.runtime import cli, sharding
from strip_mlp.evaluation import evaluate
from strip_mlp.checkpoints import model_checkpoint
from strip_mlp.train import plan
from strip_mlp.errors import EvalError


def default_output(ckpt, split: str) -> str:
  """CHECKPOINT_DIR/eval_<split>[_step<N>][_ema].json; ./eval_<split>.json for a .pth file;
  ./eval.json when the directory is read-only (no write bit: honoured even for root)."""
  name = f"eval_{split}"
  if not os.path.isdir(ckpt.path):
    return os.path.abspath(name + ".json")
  root = ckpt.path
  if not (os.stat(root).st_mode & 0o222) or not os.access(root, os.W_OK):
    return os.path.abspath("eval.json")
  if ckpt.step is not None:
    name += f"_step{ckpt.step}"
  if ckpt.ema:
    name += "_ema"
  return os.path.join(root, name + ".json")


def _write_json(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_output(output: str):
  """--output must name a file in a directory that takes files: checked before loading."""
  path = os.path.abspath(output)
  if os.path.isdir(path):
    raise cli.UsageError(
        f"--output={output} is a directory; give a file name, e.g. "
        f"{os.path.join(output, 'eval.json')}"
    )
  cli.check_writable_dir(os.path.dirname(path), "the --output directory")


def write_results(result: dict, output: str | None, default: str) -> str:
  """Writes the JSON to --output, else `default`, else ./eval.json; returns the path.

  The results are never lost: when --output cannot be written the next place is used and
  an EvalError says where they went (exit code 1: what was asked for did not happen);
  when no place can be written they are printed as JSON and the EvalError says so.
  """
  targets = [p for p in (output, default, os.path.abspath("eval.json")) if p]
  targets = list(dict.fromkeys(targets))
  failed = []
  for path in targets:
    try:
      _write_json(path, result)
    except OSError as e:
      failed.append(f"{path} ({e.strerror or e})")
      continue
    print(f"wrote {path}", flush=True)
    if output and path != output:
      raise EvalError(
          f"cannot write --output {failed[0]}; the results were written to " f"{path} instead"
      )
    if failed:
      print(f"note: cannot write {failed[0]}; wrote {path} instead", flush=True)
    return path
  print(json.dumps(result, indent=2), flush=True)
  raise EvalError(
      f"cannot write the results to {' nor '.join(failed)}; they are printed " "above as JSON"
  )


def summary(metrics: dict, ckpt, config, batch_size: int, platform: str) -> dict:
  keys = ("top1", "top5", "loss", "count", "images_per_sec", "num_examples", "dataset", "split")
  return {
      **{k: metrics[k] for k in keys},
      "checkpoint": ckpt.path,
      "kind": ckpt.kind,
      "step": ckpt.step,
      "ema": ckpt.ema,
      "dtype": str(ckpt.model.config_dict()["dtype"]),
      "model": ckpt.model.config_dict(),
      "image_size": int(config.data.image_size),
      "batch_size": batch_size,
      "num_batches": metrics["num_batches"],
      "num_devices": metrics["num_devices"],
      "num_processes": metrics["num_processes"],
      "platform": platform,
      "seconds": metrics["seconds"],
      "compile_seconds": metrics["compile_seconds"],
  }


def at_size(ckpt, img_size: int, resize: str):
  """The checkpoint to evaluate at `img_size`: as it is (windows), or a Strip-MLP built at
  img_size with its strip-length weights resampled (interpolate)."""
  if img_size % 32:
    raise cli.UsageError(f"--img_size={img_size} must be a multiple of 32")
  if resize == "windows" or img_size == getattr(ckpt.model, "img_size", img_size):
    return ckpt
  from strip_mlp.models import resample  # pylint: disable=g-import-not-at-top

  target = ckpt.model.clone(img_size=img_size)
  variables = resample.resample_variables(ckpt.variables, ckpt.model, target)
  return dataclasses.replace(ckpt, model=target, variables=variables)


def run(fv, config, explicit_config: bool) -> dict:
  """Evaluates as eval.py's flags `fv` say on the data of `config` (`explicit_config`: given
  with --config, so it must describe the checkpoint's model); returns the result dict,
  also written as JSON.

  Everything cheap comes first (the data config, --output, the checkpoint's location, the
  batch size), then the checkpoint against --config and the dataset, then the compile.
  """
  plan.validate_data_config(config.data)
  if fv.output:
    check_output(fv.output)
  model_checkpoint.locate_checkpoint(fv.checkpoint)
  cli.start_processes(fv)
  n_dev = jax.device_count()
  batch_size = fv.batch_size
  if batch_size is None:
    batch_size = int(config.get("eval_batch_size") or config.get("batch_size") or 256)
    batch_size = -(-batch_size // n_dev) * n_dev
  evaluate.check_batch_size(batch_size, n_dev, jax.process_count())
  mesh = sharding.create_mesh()
  ckpt = model_checkpoint.load_weights(
      fv.checkpoint, step=fv.step, which=fv.which, ema=fv.ema, dtype=fv.dtype, mesh=mesh
  )
  if explicit_config:
    evaluate.check_config_model(ckpt.model, config, "--config")
  if fv.img_size:
    ckpt = at_size(ckpt, fv.img_size, fv.resize)
    config.data.image_size = fv.img_size
  evaluate.check_model_fits_data(
      ckpt.model,
      config.data,
      plan.read_dataset_info(config.data),
      any_size=bool(fv.img_size) and fv.resize == "windows",
  )
  main_process = jax.process_index() == 0
  if main_process:
    print(f"evaluating {ckpt.describe()}", flush=True)
  any_size = bool(fv.img_size) and fv.resize == "windows"
  metrics = evaluate.evaluate(ckpt.model, ckpt.variables, config.data, batch_size, mesh, any_size)
  result = summary(metrics, ckpt, config, batch_size, jax.devices()[0].platform)
  if main_process:
    print(
        f"{metrics['dataset']}:{metrics['split']}  top-1 {100 * metrics['top1']:.2f}%  "
        f"top-5 {100 * metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
        f"count {metrics['count']} (split size {metrics['num_examples']})  "
        f"{metrics['images_per_sec']:.1f} images/s on {metrics['num_devices']} "
        f"{result['platform']} device(s), {metrics['num_processes']} process(es), batch "
        f"{batch_size}",
        flush=True,
    )
    result["output"] = write_results(result, fv.output, default_output(ckpt, metrics["split"]))
  return result
