"""Meshes, FSDP partition specs and the start of JAX's distributed runtime
(strip_mlp/runtime/sharding.py)."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from strip_mlp.runtime import sharding
from strip_mlp.errors import DistributedSetupError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "shape, fsdp, want",
    [
        ((64, 128), 2, P(None, "fsdp")),  # the largest divisible dimension
        ((128, 64), 4, P("fsdp", None)),
        ((96, 100), 8, P("fsdp", None)),  # 100 is not divisible by 8, 96 is
        ((63, 65), 2, P()),  # no divisible dimension: replicated
        ((16,), 2, P()),  # small leaves stay replicated
        ((), 2, P()),  # scalars
        ((64, 128), 1, P()),  # fsdp 1: everything replicated
        ((3, 3, 64, 64), 2, P(None, None, "fsdp", None)),  # ties: the first largest
    ],
)
def test_fsdp_spec(shape, fsdp, want):
  assert sharding.fsdp_spec(shape, fsdp) == want


def test_train_state_shardings_split_params_and_moments_alike():
  mesh = sharding.create_mesh(fsdp=2)
  assert dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2}
  params = {"big": jnp.zeros((64, 128)), "small": jnp.zeros((8,))}
  opt_state = optax.adamw(1e-3).init(params)
  shardings = sharding.tree_shardings({"params": params, "opt": opt_state}, mesh)
  assert shardings["params"]["big"].spec == P(None, "fsdp")
  assert shardings["params"]["small"].spec == P()
  mu = opt_state[0].mu  # ScaleByAdamState: the first moments have the params' specs
  assert jax.tree_util.tree_map(lambda s: s.spec, sharding.tree_shardings(mu, mesh)) == {
      "big": P(None, "fsdp"),
      "small": P(),
  }
  placed = sharding.put_global(params, shardings["params"])
  assert placed["big"].addressable_shards[0].data.shape == (64, 64)


def test_batch_sharding_splits_over_every_device():
  mesh = sharding.create_mesh(fsdp=2)
  x = sharding.put_global(jnp.arange(16.0), sharding.batch_sharding(mesh))
  assert len({s.device for s in x.addressable_shards}) == jax.device_count()
  assert x.addressable_shards[0].data.shape == (16 // jax.device_count(),)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_distributed_start_from_launcher_environment():
  """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, as a launcher sets them,
  start the real distributed runtime (one process here) without any flag."""
  code = (
      "import jax\nfrom strip_mlp.runtime import sharding\n"
      "started = sharding.maybe_initialize_distributed()\n"
      "print(started, jax.process_count(), jax.process_index())\n"
      "jax.distributed.shutdown()\n"
  )
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "JAX_NUM_PROCESSES": "1",
      "JAX_PROCESS_ID": "0",
      "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
  }
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["True", "1", "0"]


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"JAX_COORDINATOR_ADDRESS": "nohost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            "must be HOST:PORT",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "localhost:1234"}, "give --num_processes=N"),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1234",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "2",
            },
            r"--process_id=2 must be in \[0, 2\)",
        ),
    ],
)
def test_incomplete_launcher_environment_is_one_line(monkeypatch, env, message):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(DistributedSetupError, match=message) as e:
    sharding.maybe_initialize_distributed()
  assert "\n" not in str(e.value)


def test_no_launcher_environment_is_one_plain_process(monkeypatch):
  for k in (
      "JAX_COORDINATOR_ADDRESS",
      "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE",
      "TPU_WORKER_HOSTNAMES",
  ):
    monkeypatch.delenv(k, raising=False)
  assert sharding.maybe_initialize_distributed() is False
