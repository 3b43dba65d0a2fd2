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
import re
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _REPO)  # `import configs`
PROG = "eval.py"

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from strip_mlp import cli, data  # noqa: E402
from strip_mlp.errors import UserError  # noqa: E402

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "default.py")
_HELP = ("-h", "--help", "--helpshort", "--helpfull")


_STDERR_FD = os.dup(2)  # stderr even while TensorFlow's import notices are redirected


def _on_sigint(signum, frame):
  del signum, frame
  sys.stdout.flush()
  os.write(_STDERR_FD, f"{PROG}: interrupted; nothing was written\n".encode())
  os._exit(130)  # pylint: disable=protected-access  (eval.py has nothing to save)


class UsageError(UserError, ValueError):
  """Bad or missing flags."""


def _define_flags(argv, fv: flags.FlagValues):
  flags.DEFINE_string("checkpoint", None, "Training workdir, converted checkpoint directory "
                      "or PyTorch .pth file.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Training workdirs: evaluate this step.", flag_values=fv)
  flags.DEFINE_enum("which", None, ["latest", "best"], "Training workdirs without --step: "
                    "the latest checkpoint (default) or the best by eval top-1.", flag_values=fv)
  flags.DEFINE_boolean("ema", False, "Training workdirs: evaluate the EMA weights "
                       "(--ema / --no-ema).", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Global eval batch size (default: the config's "
                       "eval_batch_size or batch_size, rounded up to a multiple of the "
                       "device count).", flag_values=fv)
  flags.DEFINE_string("output", None, "JSON file for the results.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the "
                    "checkpoint's); parameters stay float32.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Index of this process.", flag_values=fv)
  flags.DEFINE_string("compilation_cache_dir", None, "Persistent JAX compilation cache ('' "
                      "turns it off). Default: $JAX_COMPILATION_CACHE_DIR, else "
                      f"{cli.DEFAULT_COMPILATION_CACHE} (shared with train.py).", flag_values=fv)
  # --config: an explicit file, else the config saved in a training workdir, else default.py.
  explicit = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
  saved = None if explicit else _workdir_config(_prescan(argv, "checkpoint"))
  if saved is not None:
    config_flags.DEFINE_config_dict("config", saved, "Config (from the training workdir).",
                                    flag_values=fv, sys_argv=argv)
  else:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file "
                                    "(configs/<name>.py[:arg]) for the data.",
                                    flag_values=fv, sys_argv=argv)
  return explicit


def _prescan(argv, name):
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _workdir_config(path):
  """The resolved config saved by train.py in the workdir of `path`, on top of
  configs/common.base_config() (so that overrides keep their types), or None."""
  if not path:
    return None
  try:
    from strip_mlp.evaluate import (  # pylint: disable=g-import-not-at-top
        WORKDIR_CONFIG, locate_checkpoint)
    kind, root, _ = locate_checkpoint(path)
    if kind != "workdir":
      return None
    with open(os.path.join(os.path.dirname(root), WORKDIR_CONFIG)) as f:
      resolved = json.load(f)["config"]
  except (ValueError, OSError, KeyError):
    return None  # main() reports what is wrong with the checkpoint
  from configs import common  # pylint: disable=g-import-not-at-top
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


def parse_flags(argv) -> tuple[flags.FlagValues, bool]:
  """(flag values, whether --config was given). Raises UsageError (one line)."""
  from strip_mlp import plan  # pylint: disable=g-import-not-at-top
  argv = [a.replace("--no-ema", "--noema") if a.split("=")[0] == "--no-ema" else a
          for a in argv]
  fv = flags.FlagValues()
  try:
    explicit = _define_flags(argv, fv)   # config overrides are applied here already
    rest = fv(argv)
  except flags.Error as e:
    raise UsageError(plan.describe_flag_error(e)) from None
  except (AttributeError, KeyError) as e:
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    raise UsageError(f"unknown config key in {' '.join(bad)}"
                     + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
                     + "; the keys are listed in configs/common.py") from None
  except Exception as e:  # pylint: disable=broad-except  (a config file's own code)
    raise UsageError(plan.describe_config_load_error(_prescan(argv, "config"), e)) from None
  if not isinstance(fv["config"].value, ml_collections.ConfigDict):
    raise UsageError(plan.describe_config_load_error(
        _prescan(argv, "config"), getattr(fv["config"].value, "_error", None)))
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
  if not fv.checkpoint:
    raise UsageError("--checkpoint=DIR is required")
  return fv, explicit


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
  from strip_mlp import plan  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(output)
  if os.path.isdir(path):
    raise UsageError(f"--output={output} is a directory; give a file name, e.g. "
                     f"{os.path.join(output, 'eval.json')}")
  plan.check_writable_dir(os.path.dirname(path), "the --output directory")


def write_results(result: dict, output: str | None, default: str) -> str:
  """Writes the JSON to --output, else `default`, else ./eval.json; returns the path.

  The results are never lost: when --output cannot be written the next place is used and
  an EvalError says where they went (exit code 1: what was asked for did not happen);
  when no place can be written they are printed as JSON and the EvalError says so.
  """
  from strip_mlp.evaluate import EvalError  # pylint: disable=g-import-not-at-top
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
      raise EvalError(f"cannot write --output {failed[0]}; the results were written to "
                      f"{path} instead")
    if failed:
      print(f"note: cannot write {failed[0]}; wrote {path} instead", flush=True)
    return path
  print(json.dumps(result, indent=2), flush=True)
  raise EvalError(f"cannot write the results to {' nor '.join(failed)}; they are printed "
                  "above as JSON")


def _summary(metrics: dict, ckpt, config, batch_size: int, platform: str) -> dict:
  keys = ("top1", "top5", "loss", "count", "images_per_sec", "num_examples", "dataset",
          "split")
  return {**{k: metrics[k] for k in keys},
          "checkpoint": ckpt.path, "kind": ckpt.kind, "step": ckpt.step, "ema": ckpt.ema,
          "dtype": str(ckpt.model.config_dict()["dtype"]), "model": ckpt.model.config_dict(),
          "image_size": int(config.data.image_size), "batch_size": batch_size,
          "num_batches": metrics["num_batches"], "num_devices": metrics["num_devices"],
          "num_processes": metrics["num_processes"], "platform": platform,
          "seconds": metrics["seconds"], "compile_seconds": metrics["compile_seconds"]}


def _start(fv):
  """Everything cheap, before the checkpoint is loaded: the data config, --output, the
  checkpoint's location, the processes, the compilation cache."""
  from strip_mlp import evaluate as ev  # pylint: disable=g-import-not-at-top
  from strip_mlp import plan, sharding  # pylint: disable=g-import-not-at-top
  plan.validate_data_config(fv.config.data)
  if fv.output:
    _check_output(fv.output)
  ev.locate_checkpoint(fv.checkpoint)
  sharding.maybe_initialize_distributed(fv.coordinator_address, fv.num_processes,
                                        fv.process_id)
  sharding.enable_compilation_cache(cli.compilation_cache_dir(fv.compilation_cache_dir))


def run(fv, explicit_config: bool) -> dict:
  """Evaluates as the flags say; returns the result dict (also written as JSON)."""
  _start(fv)
  import jax  # pylint: disable=g-import-not-at-top
  from strip_mlp import evaluate as ev  # pylint: disable=g-import-not-at-top
  from strip_mlp import plan, sharding  # pylint: disable=g-import-not-at-top
  config = fv.config
  n_dev = jax.device_count()
  batch_size = fv.batch_size
  if batch_size is None:
    batch_size = int(config.get("eval_batch_size") or config.get("batch_size") or 256)
    batch_size = -(-batch_size // n_dev) * n_dev
  ev.check_batch_size(batch_size, n_dev, jax.process_count())
  mesh = sharding.create_mesh()
  ckpt = ev.load_for_eval(fv.checkpoint, step=fv.step, which=fv.which, ema=fv.ema,
                          dtype=fv.dtype, mesh=mesh)
  if explicit_config:
    ev.check_config_model(ckpt.model, config, "--config")
  # The dataset (splits, class count) before anything is compiled.
  ev.check_model_fits_data(ckpt.model, config.data, plan.read_dataset_info(config.data))
  main_process = jax.process_index() == 0
  if main_process:
    print(f"evaluating {ckpt.describe()}", flush=True)
  metrics = ev.evaluate(ckpt.model, ckpt.variables, config.data, batch_size, mesh)
  result = _summary(metrics, ckpt, config, batch_size, jax.devices()[0].platform)
  if main_process:
    print(f"{metrics['dataset']}:{metrics['split']}  top-1 {100 * metrics['top1']:.2f}%  "
          f"top-5 {100 * metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
          f"count {metrics['count']} (split size {metrics['num_examples']})  "
          f"{metrics['images_per_sec']:.1f} images/s on {metrics['num_devices']} "
          f"{result['platform']} device(s), {metrics['num_processes']} process(es), batch "
          f"{batch_size}", flush=True)
    result["output"] = write_results(result, fv.output,
                                     _default_output(ckpt, metrics["split"]))
  return result


def _one_line(text) -> str:
  return " ".join(str(text).split())


def main(argv=None) -> int:
  """Returns the exit code: 0, or 1 after printing one line `eval.py: error: ...`."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in _HELP for a in argv[1:]):
    fv = flags.FlagValues()
    _define_flags([argv[0]], fv)
    print(__doc__)
    print(fv.get_help())
    return 0
  logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  try:
    fv, explicit = parse_flags(argv)
    run(fv, explicit)
  except UserError as e:
    message = _one_line(e)
  except OSError as e:  # a full disk, permissions, a file that vanished: not a bug of ours
    message = _one_line(f"{e.strerror or e}{f' {e.filename}' if e.filename else ''} "
                        f"({type(e).__name__})")
  except pipeline.ReadError as e:  # tf.data: an unreadable or corrupt file of the dataset
    message = _one_line(f"reading the data failed: {e.message}")
  except RuntimeError as e:  # jax.errors.JaxRuntimeError from XLA
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = _one_line(f"out of device memory ({str(e).strip().splitlines()[0][:300]}); "
                        "lower --batch_size or use --dtype=bfloat16")
  else:
    return 0
  print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
  return 1


if __name__ == "__main__":
  signal.signal(signal.SIGINT, _on_sigint)
  data.import_tensorflow_quietly()
  sys.exit(main())
