"""train.py and eval.py on a workdir that went wrong: damaged checkpoints, and a workdir
another run holds. Each case runs the real programs in subprocesses (JAX on one CPU device,
the embedded digits, the session's compilation cache) on a copy of one real tiny run
(steps 2 and 4 saved) and asserts the lines a user sees, the exit code and the files.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train_test_utils as utils  # noqa: E402
from test_checkpoint_recovery import damage, snapshot  # noqa: E402

TIMEOUT_S = 300  # generous: the import alone takes 5-10 s on 2 busy cores
ARGS = [
    "--config.model.layers=(0,0,0,0)",
    "--config.num_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=100",
    "--config.warmup_steps=1",
    "--config.log_every_steps=1",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  return {
      **os.environ,
      **utils.CACHE_ENV,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "TFDS_DATA_DIR": str(base / "tfds"),
      "PYTHONUNBUFFERED": "1",
  }


def _run(prog, args, env, **kw):
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, prog, *args],
      cwd=utils.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
      **kw,
  )
  proc.seconds = time.time() - t0
  proc.report = (
      f"rc={proc.returncode} after {proc.seconds:.0f}s\nstdout:\n{proc.stdout[-3000:]}\n"
      f"stderr:\n{proc.stderr[-3000:]}"
  )
  return proc


def _train(workdir, env, *extra):
  return _run("train.py", ["--workdir", str(workdir), *ARGS, *extra], env)


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
  """A real tiny run: 4 steps, checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  proc = _train(workdir, env)
  assert proc.returncode == 0, proc.report
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


@pytest.fixture
def workdir(first_run, tmp_path):
  path = tmp_path / "workdir"
  shutil.copytree(first_run, path)
  return path


# ----------------------------------------------------------------------------- damage


@pytest.mark.parametrize(
    "how,why",
    [
        ("truncated", "is truncated ("),
        ("no_commit_marker", "it has no commit marker (commit_success.txt)"),
    ],
)
def test_train_resumes_from_the_newest_intact_step(workdir, env, how, why):
  ckpts = workdir / "checkpoints"
  damage(str(ckpts / "4"), how)
  damaged_files = snapshot(str(ckpts / "4"))

  proc = _train(workdir, env)

  assert proc.returncode == 0, proc.report
  warnings = [line for line in _lines(proc.stdout) if "warning" in line.lower()]
  assert len(warnings) == 1, proc.report
  assert warnings[0].startswith("warning: checkpoint step 4 is damaged (") and why in warnings[0]
  assert f"kept it as {ckpts}/4.damaged " in warnings[0]
  assert warnings[0].endswith("resuming from step 2, the newest intact one")
  assert f"resumed from {ckpts}/2 (step 2)" in proc.stdout
  assert "done: 4 steps" in proc.stdout
  assert "Traceback" not in proc.stdout + proc.stderr and not _lines(proc.stderr), proc.report
  assert snapshot(str(ckpts / "4.damaged")) == damaged_files  # kept, byte for byte
  assert sorted(os.listdir(ckpts)) == ["2", "4", "4.damaged"]  # step 4 saved afresh
  assert not os.path.exists(workdir / "train.lock")


def test_train_with_no_intact_step_is_one_line_and_touches_nothing(workdir, env):
  damage(str(workdir / "checkpoints" / "4"), "truncated")
  damage(str(workdir / "checkpoints" / "2"), "no_commit_marker")
  before = snapshot(str(workdir))

  proc = _train(workdir, env)

  lines = _lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1, proc.report
  assert lines[0].startswith(
      f"train.py: error: no intact checkpoint in {workdir}/checkpoints (step 4: state/"
  ), proc.report
  assert "step 2: it has no commit marker" in lines[0] and "nothing was changed" in lines[0]
  assert "Traceback" not in proc.stdout + proc.stderr
  assert snapshot(str(workdir)) == before  # no lock, config, metrics or checkpoint change


def test_eval_on_a_damaged_step_is_one_line(workdir, env):
  damage(str(workdir / "checkpoints" / "4"), "truncated")
  proc = _run("eval.py", ["--checkpoint", str(workdir)], env)
  lines = _lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1, proc.report
  assert lines[0].startswith(
      f"eval.py: error: checkpoint step 4 in {workdir}/checkpoints is damaged (state/"
  ), proc.report
  assert "is truncated (" in lines[0] and "--step (steps: 2)" in lines[0]


# ----------------------------------------------------------------------------- the lock

_HOLDER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from strip_mlp.checkpoints import workdir_lock
workdir_lock.acquire(sys.argv[1])
print("held", flush=True)
if sys.argv[2] == "die":
  os._exit(0)  # gone without releasing, as a killed run
time.sleep(600)
"""


def _holder(workdir, env, mode):
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER.format(repo=utils.REPO), str(workdir), mode],
      env=env,
      stdout=subprocess.PIPE,
      text=True,
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_run_on_a_held_workdir_is_refused(workdir, env):
  holder = _holder(workdir, env, "live")
  try:
    before = snapshot(str(workdir))
    proc = _train(workdir, env)
  finally:
    holder.kill()
    holder.wait()
  lines = _lines(proc.stderr)
  assert proc.returncode == 1 and len(lines) == 1, proc.report
  assert lines[0].startswith(
      f"train.py: error: --workdir {workdir} is in use by another run (host "
      f"{os.uname().nodename}, pid {holder.pid}, started "
  ), proc.report
  assert lines[0].endswith(
      f"or use another --workdir (if that run is gone, delete {workdir}/train.lock)"
  )
  assert not _lines(proc.stdout), proc.report  # refused before building anything
  assert snapshot(str(workdir)) == before


def test_stale_lock_of_a_dead_run_is_taken_over(workdir, env):
  dead = _holder(workdir, env, "die")
  dead.wait()
  assert os.path.exists(workdir / "train.lock")

  proc = _train(workdir, env)

  assert proc.returncode == 0, proc.report
  warnings = [line for line in _lines(proc.stdout) if "warning" in line.lower()]
  assert warnings == [
      f"warning: took over {workdir}/train.lock from a run that is gone (host "
      f"{os.uname().nodename}, pid {dead.pid}, started {warnings[0].split('started ')[1]}"
  ], proc.report
  assert warnings[0].endswith(": no such process)")
  assert not os.path.exists(workdir / "train.lock")  # released at the end


def test_second_train_py_is_refused_and_sigterm_releases_the_lock(workdir, env):
  """A real first train.py (long schedule) holds the workdir; a second is refused naming
  it; SIGTERM ends the first (saving, or before training) and removes its lock."""
  shutil.rmtree(workdir)
  first = subprocess.Popen(
      [sys.executable, "train.py", "--workdir", str(workdir), *ARGS, "--config.num_steps=100000"],
      cwd=utils.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    deadline = time.time() + TIMEOUT_S
    while not os.path.exists(workdir / "train.lock"):
      assert first.poll() is None and time.time() < deadline, first.stdout.read()
      time.sleep(0.2)
    second = _train(workdir, env)
    assert first.poll() is None, "the first run ended before the second was refused"
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=TIMEOUT_S)
  finally:
    first.kill()
  lines = _lines(second.stderr)
  assert second.returncode == 1 and len(lines) == 1, second.report
  assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid}, " in lines[0]
  assert first.returncode in (0, -signal.SIGTERM), out[-3000:]
  assert not os.path.exists(workdir / "train.lock"), out[-3000:]
