"""Two processes on localhost (jax.distributed, gloo CPU collectives, 2 devices each) train
on a 4-device global mesh, write one shared checkpoint, and match a single process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import train_test_utils as utils  # noqa: E402

from strip_mlp.runtime import sharding  # noqa: E402
from strip_mlp.checkpoints import train_checkpoint  # noqa: E402
from strip_mlp.train import train_lib  # noqa: E402
from strip_mlp.data import pipeline  # noqa: E402
from strip_mlp.train.build import build  # noqa: E402

STEPS = 3
TIMEOUT_S = 480


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(workdir, num_processes=2):
  port = free_port()
  env = {
      **os.environ,
      **utils.CACHE_ENV,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
      "PYTHONUNBUFFERED": "1",
  }
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
  procs = [
      subprocess.Popen(
          [sys.executable, worker, str(i), str(num_processes), str(port), str(workdir), str(STEPS)],
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          env=env,
      )
      for i in range(num_processes)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return [json.loads(out.split("RESULT ")[1].splitlines()[0]) for out in outs]


def test_two_processes_match_one_process_and_share_a_checkpoint(tmp_path):
  results = run_workers(tmp_path / "multi")
  for r in results:
    assert r == {**r, "step": STEPS, "stopped": True, "process_count": 2, "device_count": 4}
  assert results[0]["train_loss"] == results[1]["train_loss"]

  # One process, 8 devices, fed the same global batches (each half read as process 0/1 does).
  config = utils.small_config(**utils.MINI)
  single = train_lib.train_and_evaluate(
      config,
      str(tmp_path / "single"),
      stop_at_step=STEPS,
      train_iterator_fn=utils.simulated_hosts_iterator(2),
  )
  multi_losses = [r["loss"] for r in utils.read_metrics(tmp_path / "multi")]
  single_losses = [r["loss"] for r in utils.read_metrics(tmp_path / "single")]
  assert len(multi_losses) == STEPS
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)

  # The processes wrote one checkpoint; this process restores it on its 8 devices.
  ckpt = train_checkpoint.Checkpointer(str(tmp_path / "multi" / "checkpoints"))
  assert ckpt.all_steps() == [STEPS]
  meta = ckpt.read_meta(STEPS)
  assert meta["num_processes"] == 2 and meta["num_devices"] == 4
  info = pipeline.get_dataset_info(config.data)
  run = build(config, info, sharding.create_mesh())
  target = run.abstract_state
  ckpt.check_compatible(STEPS, target, run.model.config_dict())
  restored, _ = ckpt.restore(STEPS, target)
  ckpt.close()
  assert int(restored.step) == STEPS
  assert len(restored.params["head"]["kernel"].sharding.device_set) == 8
  ref = jax.device_get(single["state"])
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
      jax.device_get(restored),
      ref,
  )
