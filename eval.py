r"""Evaluates a Strip-MLP checkpoint: top-1, top-5, loss, example count and images/s.

    python eval.py --checkpoint /tmp/demo                        # train.py workdir: latest
    python eval.py --checkpoint /tmp/demo --which best --ema     # or --step 300, --no-ema
    python eval.py --checkpoint converted/tiny_light --config configs/imagenet_tiny_light.py \
        --config.data.data_dir=/data/tfds --batch_size 1024 --dtype bfloat16

--checkpoint: a training workdir (or its checkpoints/ or one step directory), a directory
written by convert_torch_weights.py, or a PyTorch .pth file. The model always comes from the
checkpoint; the config supplies the data (default: the config saved in the training workdir,
else configs/default.py, the embedded digits) and --config.data.* overrides it, e.g.
--config.data.eval_split=train. Results are printed and written as JSON (--output; default
CHECKPOINT_DIR/eval_<split>[_step<N>][_ema].json, ./eval.json when CHECKPOINT_DIR is
read-only, ./eval_<split>.json for a .pth file).
Multi-process runs (one process per host) start JAX's distributed runtime as train.py does.

Every error is one line `eval.py: error: ...` on stderr with exit code 1. Flags, data config
values, --output and the checkpoint's location are checked before the checkpoint is loaded;
the checkpoint against --config and the dataset (splits, classes) before any compile. When --output cannot be
written after the evaluation, the results go to the default location instead (or are
printed as JSON when that fails too) and the exit code is 1. Ctrl-C exits with 130.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROG = "eval.py"

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from strip_mlp import cli, data  # noqa: E402
from strip_mlp.errors import EvalError  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_STDERR_FD = os.dup(2)  # stderr even while TensorFlow's import notices are redirected


def _on_sigint(signum, frame):
  del signum, frame
  sys.stdout.flush()
  os.write(_STDERR_FD, f"{PROG}: interrupted; nothing was written\n".encode())
  os._exit(130)  # pylint: disable=protected-access  (eval.py has nothing to save)


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  """eval.py's flags on `fv`; config_flags applies the --config.* overrides of `argv`."""
  flags.DEFINE_string(
      "checkpoint",
      None,
      "Training workdir, converted checkpoint directory " "or PyTorch .pth file.",
      flag_values=fv,
  )
  flags.DEFINE_integer("step", None, "Training workdirs: evaluate this step.", flag_values=fv)
  flags.DEFINE_enum(
      "which",
      None,
      ["latest", "best"],
      "Training workdirs without --step: "
      "the latest checkpoint (default) or the best by eval top-1.",
      flag_values=fv,
  )
  flags.DEFINE_boolean(
      "ema",
      False,
      "Training workdirs: evaluate the EMA weights " "(--ema / --no-ema).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "batch_size",
      None,
      "Global eval batch size (default: the config's "
      "eval_batch_size or batch_size, rounded up to a multiple of the "
      "device count).",
      flag_values=fv,
  )
  flags.DEFINE_string("output", None, "JSON file for the results.", flag_values=fv)
  flags.DEFINE_enum(
      "dtype",
      None,
      ["float32", "bfloat16"],
      "Compute dtype (default: the " "checkpoint's); parameters stay float32.",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "img_size",
      None,
      "Evaluate at this image size (a multiple of 32; " "default: the config's data.image_size).",
      flag_values=fv,
  )
  flags.DEFINE_enum(
      "resize",
      "windows",
      ["windows", "interpolate"],
      "Strip-MLP at another "
      "--img_size than it was trained at: the trained strip layers on "
      "overlapping windows, or its strip-length weights resampled to the new "
      "size.",
      flag_values=fv,
  )
  cli.define_process_flags(fv)
  try:
    config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "Config file (configs/<name>.py[:arg]) for the data; "
        "default: the config saved in a training workdir, else configs/default.py.",
        flag_values=fv,
        sys_argv=argv,
    )
  except (AttributeError, KeyError) as e:
    raise cli.UsageError(cli.unknown_key_message(e, argv)) from None


def _normalize(argv: list[str]) -> list[str]:
  """--no-ema, as the docs spell it, is absl's --noema."""
  return [a.replace("--no-ema", "--noema") if a.split("=")[0] == "--no-ema" else a for a in argv]


def _config(fv: flags.FlagValues) -> tuple[ml_collections.ConfigDict, bool]:
  """(config, whether --config was given). Without --config, a training workdir's saved
  config (on top of configs/common.base_config(), so overrides keep their types) with the
  --config.* overrides applied again; else configs/default.py."""
  if fv["config"].present:
    return fv.config, True
  saved = _workdir_config(fv.checkpoint)
  return (fv.config, False) if saved is None else (cli.apply_overrides(saved, fv), False)


def _workdir_config(path: str) -> ml_collections.ConfigDict | None:
  from configs import common  # pylint: disable=g-import-not-at-top
  from strip_mlp import model_checkpoint, train_checkpoint  # pylint: disable=g-import-not-at-top

  try:
    kind, root, _ = model_checkpoint.locate_checkpoint(path)
    if kind != "workdir":
      return None
    with open(os.path.join(os.path.dirname(root), train_checkpoint.CONFIG_FILE)) as f:
      resolved = json.load(f)["config"]
  except (ValueError, OSError, KeyError):
    return None  # run() reports what is wrong with the checkpoint
  config = common.base_config()

  def merge(node, values):
    for k, v in values.items():
      if k not in node:
        continue  # a key of another version of train.py
      if isinstance(v, dict):
        merge(node[k], v)
      else:
        try:
          node[k] = tuple(v) if isinstance(v, list) else v
        except TypeError:
          pass  # keep the default rather than fail on a type change

  merge(config, resolved)
  return config


def _default_output(ckpt, split: str) -> str:
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


def _check_output(output: str):
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


def _summary(metrics: dict, ckpt, config, batch_size: int, platform: str) -> dict:
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


def _at_size(ckpt, img_size: int, resize: str):
  """The checkpoint to evaluate at `img_size`: as it is (windows), or a Strip-MLP built at
  img_size with its strip-length weights resampled (interpolate)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  if img_size % 32:
    raise cli.UsageError(f"--img_size={img_size} must be a multiple of 32")
  if resize == "windows" or img_size == getattr(ckpt.model, "img_size", img_size):
    return ckpt
  from strip_mlp import resample  # pylint: disable=g-import-not-at-top

  target = ckpt.model.clone(img_size=img_size)
  variables = resample.resample_variables(ckpt.variables, ckpt.model, target)
  return dataclasses.replace(ckpt, model=target, variables=variables)


def run(fv: flags.FlagValues) -> dict:
  """Evaluates as the flags say; returns the result dict (also written as JSON).

  Everything cheap comes first (the data config, --output, the checkpoint's location, the
  batch size), then the checkpoint against --config and the dataset, then the compile.
  """
  if not fv.checkpoint:
    raise cli.UsageError("--checkpoint=DIR is required")
  import jax  # pylint: disable=g-import-not-at-top
  from strip_mlp import evaluate, model_checkpoint, plan, sharding  # pylint: disable=g-import-not-at-top

  config, explicit_config = _config(fv)
  plan.validate_data_config(config.data)
  if fv.output:
    _check_output(fv.output)
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
    ckpt = _at_size(ckpt, fv.img_size, fv.resize)
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
  result = _summary(metrics, ckpt, config, batch_size, jax.devices()[0].platform)
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
    result["output"] = write_results(result, fv.output, _default_output(ckpt, metrics["split"]))
  return result


def _guarded_run(fv: flags.FlagValues) -> int:
  cli.quiet_logging(fv)
  return cli.guarded(
      PROG, run, fv, out_of_memory_fix="lower --batch_size or use " "--dtype=bfloat16"
  )


def main(argv) -> int:
  """absl's main: the flags are parsed into flags.FLAGS already."""
  del argv  # checked by _parse_flags
  return _guarded_run(flags.FLAGS)


def run_argv(argv: list[str]) -> int:
  """The whole program on a private flag set (re-entrant: tests, notebooks); returns the
  exit code, 0 or 1 after printing one line `eval.py: error: ...`."""
  argv = _normalize(list(argv))
  fv = flags.FlagValues()
  try:
    define_flags(fv, argv)
    cli.parse_flags(argv, fv)
  except cli.UsageError as e:
    print(f"{PROG}: error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    return 1
  return _guarded_run(fv)


def _parse_flags(argv):
  try:
    return cli.parse_flags(argv)
  except cli.UsageError as e:
    print(f"{PROG}: error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  signal.signal(signal.SIGINT, _on_sigint)
  data.import_tensorflow_quietly()
  _argv = _normalize(sys.argv)
  try:
    define_flags(flags.FLAGS, _argv)
  except cli.UsageError as _e:
    print(f"{PROG}: error: {cli.one_line(_e)}", file=sys.stderr, flush=True)
    sys.exit(1)
  app.run(main, argv=_argv, flags_parser=_parse_flags)
