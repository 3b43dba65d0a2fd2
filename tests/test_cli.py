"""train.py and eval.py refuse bad command lines with one line, before any compile.

Each case runs the real program in a subprocess (JAX on CPU, a fresh --workdir, the
embedded digits in a temporary TFDS data_dir) and must end with exit code 1, exactly one
non-empty line on stderr (`<prog>: error: <message>`, nothing filtered) and no traceback
anywhere. Every check happens before the model is initialised, so a case takes about the
import time of the program. Ctrl-C must end with one line and exit code 130.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180  # generous: the import alone takes 5-10 s on 2 busy cores

# (program, extra arguments, text the error line must contain). In arguments, {tmp} is a
# per-case temporary directory and {data} a folder-dataset root (see _layout); eval.py gets
# a tiny converted checkpoint (_CHECKPOINT) unless a case names one.
CASES = [
    ("train.py", ["--config.data.source=bogus"], "data.source='bogus' must be one of"),
    ("train.py", ["--config.data.name=bogus"], "data.name='bogus' is not an embedded"),
    (
        "train.py",
        ["--config.data.source=tfds", "--config.data.name=bogus"],
        "unknown TFDS dataset 'bogus'",
    ),
    ("train.py", ["--config.data.eval_split=bogus"], "bad split 'bogus'"),
    ("train.py", ["--config.model.embed_dim=10"], "model.embed_dim=10 gives 10 channels"),
    (
        "train.py",
        ["--config.model.depthwise_impl=foo"],
        "model.depthwise_impl='foo' must be one of ('auto', 'xla', 'shift')",
    ),
    (
        "train.py",
        ["--config.model.patchify_impl=foo"],
        "model.patchify_impl='foo' must be one of ('auto', 'xla', 'einsum')",
    ),
    ("train.py", ["--config.data.randaugment=bogus"], "data.randaugment='bogus'"),
    ("train.py", ["--config", "configs/cifar10.py:huge"], "unknown variant 'huge'"),
    (
        "train.py",
        ["--config=configs/nonexistent.py"],
        "--config=configs/nonexistent.py: cannot load the config file",
    ),
    ("train.py", ["--config.lr.sclaing=none"], "unknown config key 'sclaing'"),
    ("train.py", ["--config.batch_size=abc"], "--config.batch_size=abc"),
    ("train.py", ["extra"], "unexpected arguments: extra"),
    ("train.py", ["--config.num_steps=-5"], "num_steps=-5 must be positive"),
    ("train.py", ["--config.eval_every_steps=-1"], "eval_every_steps=-1 must be positive"),
    (
        "train.py",
        ["--config.model.num_classes=5"],
        "model.num_classes=5 is smaller than the 10 classes",
    ),
    ("train.py", ["--config.init_from={tmp}/nope"], "does not exist"),
    (
        "train.py",
        ["--config.data.source=folder", "--config.data.folder_root={tmp}/nope"],
        "not found",
    ),
    (
        "train.py",
        ["--config.data.source=folder", "--config.data.folder_root={data}/no_val"],
        "no val/validation/test folder",
    ),
    (
        "train.py",
        ["--config.data.source=folder", "--config.data.folder_root={data}/extra_class"],
        "'b' in {data}/extra_class/val is not a class of the train split",
    ),
    ("train.py", ["--num_processes=2", "--process_id=0"], "needs --coordinator_address"),
    (
        "train.py",
        ["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"],
        "must be HOST:PORT",
    ),
    (
        "train.py",
        [
            "--coordinator_address=localhost:1",
            "--num_processes=2",
            "--process_id=0",
            "--heartbeat_timeout_seconds=0",
        ],
        "--heartbeat_timeout_seconds=0 must be >= 1",
    ),
    ("train.py", ["--workdir={tmp}/file"], "exists and is not a directory"),
    ("train.py", ["--workdir={tmp}/file/run"], "cannot create --workdir {tmp}/file/run"),
    # Read-only workdirs that even root cannot write: procfs (fresh, and existing).
    ("train.py", ["--workdir=/proc/self/run"], "cannot create --workdir /proc/self/run"),
    ("train.py", ["--workdir=/proc/self"], "--workdir /proc/self is not writable"),
    ("eval.py", ["--config.data.eval_split=bogus"], "bad split 'bogus'"),
    ("eval.py", ["--config.data.randaugment=bogus"], "data.randaugment='bogus'"),
    ("eval.py", ["--output={tmp}/file/eval.json"], "{tmp}/file exists and is not a directory"),
    (
        "eval.py",
        ["--output=/proc/self/eval.json"],
        "the --output directory /proc/self is not writable",
    ),
    ("eval.py", ["--output={tmp}"], "is a directory; give a file name"),
    ("eval.py", ["--num_processes=2", "--process_id=0"], "needs --coordinator_address"),
    ("eval.py", ["--config=configs/nonexistent.py"], "cannot load the config file"),
    ("eval.py", ["--config", "configs/cifar10.py:huge"], "unknown variant 'huge'"),
    ("eval.py", ["--checkpoint={tmp}/nope"], "does not exist"),
    ("eval.py", ["--batch_size=0"], "batch size 0 must be a positive multiple"),
    ("eval.py", ["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
]


def _layout(root):
  """Folder datasets: no_val/ (train only) and extra_class/ (a val class not in train).
  The files are never decoded: listing them is enough to find the problem."""
  for path in ("no_val/train/a/0.png", "extra_class/train/a/0.png", "extra_class/val/b/0.png"):
    os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
    open(os.path.join(root, path), "wb").close()


# Written once by a subprocess: a 10-class 32-px model without blocks, zero weights (no
# init compile); then the embedded digits are prepared (a first use prints progress bars).
_CHECKPOINT = """
import sys
import jax, numpy as np
from strip_mlp import StripMLP, save_checkpoint
from strip_mlp.data import digits
from strip_mlp.models.strip_mlp import abstract_variables
model = StripMLP(embed_dim=16, layers=(0, 0, 0, 0), img_size=32, num_classes=10)
zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(model))
save_checkpoint(sys.argv[1], model, dict(zeros))
digits.load_builder("digits", sys.argv[2])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Environment of the subprocesses, the folder datasets and a converted checkpoint."""
  base = tmp_path_factory.mktemp("cli")
  tfds_dir, data, ckpt = base / "tfds", base / "folders", base / "converted"
  _layout(str(data))
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "TFDS_DATA_DIR": str(tfds_dir),
      "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
      "PYTHONUNBUFFERED": "1",
  }
  proc = subprocess.run(
      [sys.executable, "-c", _CHECKPOINT, str(ckpt), str(tfds_dir)],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {"env": env, "data": str(data), "ckpt": str(ckpt)}


def _command(prog, args, setup, tmp):
  fill = lambda a: a.format(tmp=tmp, data=setup["data"])
  cmd = [sys.executable, prog] + [fill(a) for a in args]
  if prog == "train.py" and not any(a.startswith("--workdir") for a in args):
    cmd += ["--workdir", os.path.join(tmp, "workdir")]
  if prog == "eval.py" and not any(a.startswith("--checkpoint") for a in args):
    cmd += ["--checkpoint", setup["ckpt"]]
  return cmd


@pytest.mark.parametrize(
    "prog,args,expected", CASES, ids=[f"{p[:-3]}:{' '.join(a)}" for p, a, _ in CASES]
)
def test_bad_command_line_is_one_line(prog, args, expected, setup, tmp_path):
  tmp = str(tmp_path)
  open(os.path.join(tmp, "file"), "w").close()  # a file where a directory is expected
  t0 = time.time()
  proc = subprocess.run(
      _command(prog, args, setup, tmp),
      cwd=REPO,
      env=setup["env"],
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
  )
  seconds = time.time() - t0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  report = f"rc={proc.returncode} after {seconds:.0f}s\nstderr:\n{proc.stderr[-3000:]}"
  assert proc.returncode == 1, report
  assert len(lines) == 1, report
  assert lines[0].startswith(f"{prog}: error: "), report
  assert expected.format(tmp=tmp, data=setup["data"]) in lines[0], report
  assert "Traceback" not in proc.stdout + proc.stderr, report
  if prog == "train.py" and "--workdir" not in " ".join(args):
    assert not os.path.exists(os.path.join(tmp, "workdir")), "nothing written on an error"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes into chmod 555 directories; the /proc cases above "
    "cover a read-only workdir for root",
)
def test_workdir_made_read_only_is_one_line(setup, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  os.chmod(workdir, 0o555)
  try:
    proc = subprocess.run(
        _command("train.py", ["--workdir", str(workdir)], setup, str(tmp_path)),
        cwd=REPO,
        env=setup["env"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
  finally:
    os.chmod(workdir, 0o755)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert f"--workdir {workdir} is not writable" in lines[0]


def test_ctrl_c_is_one_line_and_exit_130(setup, tmp_path):
  """Ctrl-C while train.py starts (importing, checking): one line, exit code 130."""
  proc = subprocess.Popen(
      _command("train.py", [], setup, str(tmp_path)),
      cwd=REPO,
      env=setup["env"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT_S)
  finally:
    proc.kill()
  lines = [line for line in err.splitlines() if line.strip()]
  assert proc.returncode == 130, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("train.py: interrupted"), err[-3000:]
  assert "Traceback" not in out + err


def test_patchify_impl_is_a_config_key():
  """Documented in the README: accepted by the config and checked like depthwise_impl."""
  sys.path.insert(0, REPO)
  from configs import default  # pylint: disable=g-import-not-at-top
  from strip_mlp.train import plan  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  for impl in ("auto", "xla", "einsum"):
    config.model.patchify_impl = impl
    plan.validate_config(config, num_devices=1, num_processes=1)
  config.model.patchify_impl = "conv"
  with pytest.raises(plan.ConfigError, match="model.patchify_impl='conv'"):
    plan.validate_config(config, num_devices=1, num_processes=1)
