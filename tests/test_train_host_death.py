"""A host that dies: two train.py processes on localhost (2 CPU devices each), process 1
SIGKILLed mid-training. Process 0 stops within the heartbeat timeout with one line and exit
code 75; rerunning both resumes from the checkpoint the line names and ends with the
parameters of an uninterrupted run, bit for bit."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import train_test_utils as utils

from strip_mlp.runtime import sharding, supervisor
from strip_mlp.checkpoints import train_checkpoint
from strip_mlp.train.build import build
from strip_mlp.data import pipeline

HEARTBEAT_S = 5
TIMEOUT_S = 480
ARGS = utils.config_args(**utils.MINI) + [
    "--config.checkpoint_every_steps=5",
    "--config.eval_every_steps=1000",  # only the last step evaluates
    f"--heartbeat_timeout_seconds={HEARTBEAT_S}",
]


def _start(workdir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {
      **os.environ,
      **utils.CACHE_ENV,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
      "PYTHONUNBUFFERED": "1",
  }
  common = [f"--workdir={workdir}", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  return [
      subprocess.Popen(
          [sys.executable, "train.py", *ARGS, *common, f"--process_id={i}"],
          cwd=utils.REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]


def _finish(procs):
  try:
    return [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      p.kill()


def _run(workdir):
  procs = _start(workdir)
  outs = _finish(procs)
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out[-3000:] + err[-3000:]
  return outs[0][0]


def _final_state(workdir, step):
  config = utils.small_config(**utils.MINI)
  run = build(config, pipeline.get_dataset_info(config.data), sharding.create_mesh(2))
  ckpt = train_checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    state, _ = ckpt.restore(step, run.abstract_state)
  finally:
    ckpt.close()
  return jax.device_get(state)


def test_a_killed_process_stops_the_other_with_one_line_and_a_rerun_resumes(tmp_path):
  _run(tmp_path / "uninterrupted")

  workdir = tmp_path / "killed"
  procs = _start(workdir)
  for line in procs[0].stdout:  # kill process 1 once a checkpoint is committed
    if line.startswith("saved checkpoint"):
      break
  procs[1].send_signal(signal.SIGKILL)
  t_kill = time.time()
  try:
    err = procs[0].communicate(timeout=TIMEOUT_S)[1]
  finally:
    _finish(procs)
  seconds = time.time() - t_kill
  print(f"process 0 stopped {seconds:.1f}s after the kill")  # shown by pytest -s
  checkpoints = os.path.join(workdir, "checkpoints")
  step = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  assert 5 <= step < utils.TOTAL_STEPS
  assert procs[0].returncode == supervisor.EXIT_PEER_LOST, err
  assert [line for line in err.splitlines() if not line.startswith("[Gloo]")] == [
      "train.py: error: process 1 of 2 stopped answering (killed, out of memory, or its host "
      "is gone), so process 0 stopped too; the last committed checkpoint is step "
      f"{step} ({checkpoints}/{step}): rerun the same command on all processes to resume "
      "from it"
  ]
  assert seconds < HEARTBEAT_S + 15, f"process 0 stopped {seconds:.0f}s after the kill"

  out = _run(workdir)
  assert f"resumed from {checkpoints}/{step} (step {step})" in out
  final = utils.TOTAL_STEPS
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      _final_state(workdir, final),
      _final_state(tmp_path / "uninterrupted", final),
  )
