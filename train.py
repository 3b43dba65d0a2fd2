r"""Trains Strip-MLP: the same command on one CPU, one GPU, many GPUs or a TPU pod.

    python train.py --workdir /tmp/demo                                # offline demo
    python train.py --config configs/imagenet_tiny.py --workdir gs://b/run \
        --config.data.data_dir=/data/tfds --config.batch_size=2048

Overrides: --config.<key>=<value> for any key of the config (see configs/common.py).
Rerunning the same command resumes from the newest checkpoint in --workdir. With several
processes (one per host), JAX's distributed runtime is started from the cluster
environment (SLURM, Open MPI, TPU pods) or from --coordinator_address/--num_processes/
--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import configs.common`

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")


def _exit_unknown_key(error: Exception):
  """One line for `--config.<key>` that the config does not have."""
  what = str(error).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
  sys.exit(f"train.py: error: unknown config key {what} (in {' '.join(bad)}); the keys and "
           "their meaning are in configs/common.py")


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


def _parse_flags(argv):
  """absl flag parsing, with a one-line error for unknown or malformed config keys."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"train.py: error: {e} (see --helpfull)")
  except (AttributeError, KeyError) as e:
    _exit_unknown_key(e)


def _default_workdir() -> str:
  """workdirs/<config file name>[_<arg>], e.g. workdirs/default, workdirs/cifar100_small."""
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  name, _, arg = os.path.basename(name).partition(":")
  return os.path.join("workdirs", os.path.splitext(name)[0] + (f"_{arg}" if arg else ""))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax/absl INFO chatter; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  from strip_mlp import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  from strip_mlp import checkpointing, train_lib  # pylint: disable=g-import-not-at-top
  from strip_mlp.data_sources import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    train_lib.validate_config(config)
    result = train_lib.train_and_evaluate(config, _WORKDIR.value or _default_workdir())
  except (train_lib.ConfigError, checkpointing.CheckpointMismatchError,
          DatasetNotFoundError, train_lib.TrainingDivergedError) as e:
    sys.exit(f"train.py: error: {e}")
  return 0 if result else 1


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
