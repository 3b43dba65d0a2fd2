r"""Trains Strip-MLP: the same command on one CPU, one GPU, many GPUs or a TPU pod.

    python train.py --workdir /tmp/demo                                # offline demo
    python train.py --config configs/imagenet_tiny.py --workdir gs://b/run \
        --config.data.data_dir=/data/tfds --config.batch_size=2048

    python train.py --config configs/imagenet_tiny.py --compile_for=v5p:4x4x4 [--max_batch]

The last compiles the train step for a TPU topology here (no TPU, no data; libtpu from the
`tpu` extra) and prints its memory per chip against the HBM, FLOPs and op census
(strip_mlp/train/compile_for.py). Overrides: --config.<key>=<value> for any key of the config (see configs/common.py).
Rerunning the same command resumes from the newest checkpoint in --workdir. With several
processes (one per host), JAX's distributed runtime is started from the cluster
environment (SLURM, Open MPI, TPU pods) or from --coordinator_address/--num_processes/
--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Every problem with the flags, the config, the data or the workdir (another live run holds
it; none of its checkpoints reads back) is reported as one line `train.py: error: ...` on
stderr (exit code 1) before anything is initialised or compiled; Ctrl-C prints where to
resume (exit code 130). In a multi-process run, when a process dies hard (SIGKILL, out of
memory, host gone), every other one stops within about --heartbeat_timeout_seconds with one
line naming it and the checkpoint a rerun resumes from (exit code 75;
strip_mlp/runtime/supervisor.py). Compiled programs are kept in a persistent cache
(--compilation_cache_dir), so a rerun skips most of the compile time.
"""

import json
import os
import signal
import sys

PROG = "train.py"
if __name__ == "__main__":
  from strip_mlp.runtime import host_allocator  # no JAX: re-executes with mimalloc, here
  from strip_mlp.runtime import supervisor  # no JAX: multi-process runs start as a child, here

  host_allocator.use_packaged_allocator(PROG)
  supervisor.supervise(PROG)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_STDERR_FD = os.dup(2)  # stderr even while TensorFlow's import notices are redirected


def _say(line: str):
  sys.stdout.flush()
  os.write(_STDERR_FD, f"{PROG}: {line}\n".encode())


def _interrupted_while_loading(signum, frame):
  del signum, frame
  _say("interrupted while starting; nothing was written")
  os._exit(130)  # pylint: disable=protected-access


signal.signal(signal.SIGINT, _interrupted_while_loading)  # main() installs its own

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from strip_mlp.runtime import cli  # noqa: E402
from strip_mlp import data  # noqa: E402
from strip_mlp.checkpoints import workdir_lock  # noqa: E402

data.import_tensorflow_quietly()  # the data pipeline's, with its start-up notices dropped

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def _fail(message: str):
  print(f"{PROG}: error: {cli.one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(1)


try:  # With a default config file, config_flags applies the overrides already here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Training config file (configs/<name>.py[:arg]).", lock_config=True
  )
except (AttributeError, KeyError) as e:
  _fail(cli.unknown_key_message(e, sys.argv))
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints and metrics; rerunning with the same one "
    "resumes. Default: workdirs/<config name>.",
)
cli.define_process_flags()
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for",
    None,
    "Compile the train step for this TPU topology (e.g. v5e:2x2, v5e:16x16, v5p:4x4x4) here, "
    "without a TPU or data; print memory per chip against its HBM, FLOPs and the op census, "
    "and exit (exit code 3 when it does not fit). Needs pip install 'strip-mlp-jax[tpu]'.",
)
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch",
    False,
    "With --compile_for: search the largest batch per chip that fits, remat off and on.",
)
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "With --compile_for: GiB per chip to fit in (default: the chip's HBM)."
)


def _parse_flags(argv):
  try:
    return cli.parse_flags(argv)
  except cli.UsageError as e:
    _fail(e)


def _default_workdir() -> str:
  """workdirs/<config file name>[_<arg>], e.g. workdirs/default, workdirs/cifar100_small."""
  name, _, arg = os.path.basename(cli.config_path()).partition(":")
  return os.path.join("workdirs", os.path.splitext(name)[0] + (f"_{arg}" if arg else ""))


def _resume_point(workdir: str) -> str:
  """What a rerun will do, from the files in the workdir (for the Ctrl-C message)."""
  from strip_mlp.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top

  step, saved = None, []
  try:
    with open(os.path.join(workdir, train_checkpoint.METRICS_FILE)) as f:
      for line in f:
        row = json.loads(line) if line.strip() else {}
        step = row["step"] if row.get("kind") == "train" else step
  except (OSError, ValueError, KeyError):
    pass
  try:
    saved = [
        int(s)
        for s in os.listdir(os.path.join(workdir, train_checkpoint.CHECKPOINT_DIR))
        if s.isdigit()
    ]
  except OSError:
    pass
  where = f"at step {step}" if step is not None else "before the first logged step"
  if saved:
    return (
        f"interrupted {where}; rerun the same command to resume from the checkpoint "
        f"of step {max(saved)}"
    )
  return f"interrupted {where}, before any checkpoint; rerun the same command to start again"


def _on_sigint(signum, frame):
  """First Ctrl-C: KeyboardInterrupt (the run closes its files); second: exit at once."""
  del signum, frame
  if _on_sigint.seen:
    _say("interrupted again; exiting without waiting for checkpoint writes")
    workdir_lock.release_all()
    os._exit(130)  # pylint: disable=protected-access
  _on_sigint.seen = True
  raise KeyboardInterrupt


_on_sigint.seen = False


def _train(config, workdir: str):
  import jax  # pylint: disable=g-import-not-at-top
  from strip_mlp.train import plan, train_lib  # pylint: disable=g-import-not-at-top

  plan.validate_config(config, check_devices=False)  # before a (blocking) multi-process start
  cli.start_processes()
  plan.make_plan(config, plan.read_dataset_info(config.data))  # the data, before the workdir
  if jax.process_index() == 0:
    cli.check_writable_dir(workdir, "--workdir")
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints):
      cli.check_writable_dir(checkpoints, "the checkpoint directory")
  lock = workdir_lock.acquire(workdir)  # refused at once when a live run holds it
  try:
    train_lib.train_and_evaluate(config, workdir)
  finally:
    lock.release()


def _compile_for(config) -> int:
  """--compile_for: 0 when the step fits, 3 when it does not, 1 for a one-line error."""
  from strip_mlp.train import compile_for  # pylint: disable=g-import-not-at-top

  fits = []
  rc = cli.guarded(
      PROG,
      lambda: fits.append(
          compile_for.main(
              config,
              _COMPILE_FOR.value,
              find_max_batch=_MAX_BATCH.value,
              hbm_gib=_HBM_GIB.value,
              log=lambda line: print(line, flush=True),
          )
      ),
      out_of_memory_fix="lower batch_size",
  )
  return rc or (0 if fits[0] else 3)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  cli.quiet_logging()
  signal.signal(signal.SIGINT, _on_sigint)
  workdir_lock.release_on_sigterm()  # the training loop saves first on SIGTERM
  if _COMPILE_FOR.value is not None:
    return _compile_for(_CONFIG.value)
  if _MAX_BATCH.value or _HBM_GIB.value is not None:
    _fail("--max_batch and --hbm_gib go with --compile_for=<TPU topology>")
  workdir = _WORKDIR.value or _default_workdir()
  try:
    return cli.guarded(
        PROG,
        _train,
        _CONFIG.value,
        workdir,
        out_of_memory_fix="lower batch_size, or raise grad_accum_steps or mesh.fsdp, or use "
        "model.dtype=bfloat16",
        os_error_suffix="; fix it and rerun the same command to resume from the newest "
        "checkpoint",
    )
  except KeyboardInterrupt:
    try:
      _say(_resume_point(workdir))
    except Exception:  # pylint: disable=broad-except  (an import cut short by Ctrl-C)
      _say("interrupted; rerun the same command to resume from the newest checkpoint")
    return 130


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
