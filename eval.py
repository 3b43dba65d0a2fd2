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
if __name__ == "__main__":
  from strip_mlp.runtime import host_allocator  # no JAX: re-executes with mimalloc, here

  host_allocator.use_packaged_allocator(PROG)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from strip_mlp.runtime import cli  # noqa: E402
from strip_mlp import data  # noqa: E402

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
  # pylint: disable-next=g-import-not-at-top
  from strip_mlp.checkpoints import model_checkpoint, train_checkpoint

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


def run(fv: flags.FlagValues) -> dict:
  """Evaluates as the flags say (strip_mlp.evaluation.eval_lib.run) with the config `_config`
  picks."""
  from strip_mlp.evaluation import eval_lib  # pylint: disable=g-import-not-at-top

  if not fv.checkpoint:
    raise cli.UsageError("--checkpoint=DIR is required")
  config, explicit_config = _config(fv)
  return eval_lib.run(fv, config, explicit_config)


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
