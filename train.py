r"""Trains Strip-MLP: the same command on one CPU, one GPU, many GPUs or a TPU pod.

    python train.py --workdir /tmp/demo                                # offline demo
    python train.py --config configs/imagenet_tiny.py --workdir gs://b/run \
        --config.data.data_dir=/data/tfds --config.batch_size=2048

Overrides: --config.<key>=<value> for any key of the config (see configs/common.py).
Rerunning the same command resumes from the newest checkpoint in --workdir. With several
processes (one per host), JAX's distributed runtime is started from the cluster
environment (SLURM, Open MPI, TPU pods) or from --coordinator_address/--num_processes/
--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Every problem with the flags, the config, the data or the workdir is reported as one line
`train.py: error: ...` on stderr (exit code 1) before anything is initialised or compiled;
Ctrl-C prints where to resume (exit code 130). Compiled programs are kept in a persistent
cache (--compilation_cache_dir), so a rerun skips most of the compile time.
"""
import os
import signal
import sys

PROG = "train.py"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import configs.common`


_STDERR_FD = os.dup(2)  # stderr even while TensorFlow's import notices are redirected


def _say(line: str):
  sys.stdout.flush()
  os.write(_STDERR_FD, f"{PROG}: {line}\n".encode())


def _interrupted_while_loading(signum, frame):
  del signum, frame
  _say("interrupted while starting; nothing was written")
  os._exit(130)  # pylint: disable=protected-access


signal.signal(signal.SIGINT, _interrupted_while_loading)  # main() installs its own

from strip_mlp import cli, data  # noqa: E402

data.import_tensorflow_quietly()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")


def _fail(message: str):
  """The one-line error and exit code 1 (before main, where app.run is not yet in charge)."""
  print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(1)


def _exit_unknown_key(error: Exception):
  """One line for `--config.<key>` that the config does not have."""
  what = str(error).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
  _fail(f"unknown config key {what} (in {' '.join(bad)}); the keys and their meaning are "
        "in configs/common.py")


try:  # With a default config file, config_flags applies overrides already here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Training config file (configs/<name>.py[:arg]).",
      lock_config=True)
except (AttributeError, KeyError) as e:
  _exit_unknown_key(e)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and metrics; rerunning with the same one "
    "resumes. Default: workdirs/<config name>.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent JAX compilation cache ('' turns it off). "
    f"Default: $JAX_COMPILATION_CACHE_DIR, else {cli.DEFAULT_COMPILATION_CACHE}.")


def _parse_flags(argv):
  """absl flag parsing, with a one-line error for unknown or malformed config keys and for
  config files that cannot be loaded."""
  from strip_mlp import plan  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(plan.describe_flag_error(e) + " (see --helpfull)")
  except (AttributeError, KeyError) as e:
    _exit_unknown_key(e)
  except Exception as e:  # pylint: disable=broad-except  (a config file's own code)
    _fail(plan.describe_config_load_error(_config_path(), e))
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    _fail(plan.describe_config_load_error(_config_path(), getattr(_CONFIG.value, "_error",
                                                                   None)))
  return rest


def _config_path() -> str:
  return config_flags.get_config_filename(flags.FLAGS["config"])


def _default_workdir() -> str:
  """workdirs/<config file name>[_<arg>], e.g. workdirs/default, workdirs/cifar100_small."""
  name, _, arg = os.path.basename(_config_path()).partition(":")
  return os.path.join("workdirs", os.path.splitext(name)[0] + (f"_{arg}" if arg else ""))


def _resume_point(workdir: str) -> str:
  """What a rerun will do, from the files in the workdir (for the Ctrl-C message)."""
  import json  # pylint: disable=g-import-not-at-top
  from strip_mlp import train_lib  # pylint: disable=g-import-not-at-top
  step, saved = None, []
  try:
    with open(os.path.join(workdir, train_lib.METRICS_FILE)) as f:
      for line in f:
        row = json.loads(line) if line.strip() else {}
        step = row["step"] if row.get("kind") == "train" else step
  except (OSError, ValueError, KeyError):
    pass
  try:
    saved = [int(s) for s in os.listdir(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
             if s.isdigit()]
  except OSError:
    pass
  where = f"at step {step}" if step is not None else "before the first logged step"
  if saved:
    return (f"interrupted {where}; rerun the same command to resume from the checkpoint "
            f"of step {max(saved)}")
  return f"interrupted {where}, before any checkpoint; rerun the same command to start again"


def _on_sigint(signum, frame):
  """First Ctrl-C: KeyboardInterrupt (the run closes its files); second: exit at once."""
  del signum, frame
  if _on_sigint.seen:
    _say("interrupted again; exiting without waiting for checkpoint writes")
    os._exit(130)  # pylint: disable=protected-access
  _on_sigint.seen = True
  raise KeyboardInterrupt


_on_sigint.seen = False


def _check(config, workdir: str):
  """Everything that can be checked before initialising or compiling (ConfigError, ...)."""
  import jax  # pylint: disable=g-import-not-at-top
  from strip_mlp import plan  # pylint: disable=g-import-not-at-top
  plan.validate_config(config)
  plan.make_plan(config, plan.read_dataset_info(config.data))
  if jax.process_index() == 0:
    plan.check_writable_dir(workdir, "--workdir")
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints):
      plan.check_writable_dir(checkpoints, "the checkpoint directory")


def _run(config, workdir: str) -> int:
  from strip_mlp import plan, sharding  # pylint: disable=g-import-not-at-top
  # Device-independent checks come before the (possibly blocking) multi-process start.
  plan.validate_config(config, check_devices=False)
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  sharding.enable_compilation_cache(cli.compilation_cache_dir(_CACHE_DIR.value))
  _check(config, workdir)
  from strip_mlp import train_lib  # pylint: disable=g-import-not-at-top
  result = train_lib.train_and_evaluate(config, workdir)
  return 0 if result else 1


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  if not flags.FLAGS["verbosity"].present:  # orbax/absl INFO chatter; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  signal.signal(signal.SIGINT, _on_sigint)
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  from strip_mlp.errors import UserError  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or _default_workdir()
  try:
    return _run(_CONFIG.value, workdir)
  except UserError as e:
    _fail(e)
  except KeyboardInterrupt:
    try:
      _say(_resume_point(workdir))
    except Exception:  # pylint: disable=broad-except  (an import cut short by Ctrl-C)
      _say("interrupted; rerun the same command to resume from the newest checkpoint")
    return 130
  except OSError as e:  # full disk, permissions, a vanished file: not a bug of ours
    name = f" {e.filename}" if e.filename else ""
    _fail(f"{e.strerror or e}{name} ({type(e).__name__}); fix it and rerun the same "
          "command to resume from the newest checkpoint")
  except pipeline.ReadError as e:  # tf.data: an unreadable or corrupt file of the dataset
    _fail(f"reading the data failed: {e.message}")
  except RuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    _fail(f"out of device memory ({str(e).strip().splitlines()[0][:300]}); lower "
          "batch_size, or raise grad_accum_steps or mesh.fsdp, or use model.dtype=bfloat16")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
