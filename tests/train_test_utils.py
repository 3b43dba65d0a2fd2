"""Shared by the training tests (tests/test_train*.py) and tests/multiprocess_worker.py.

All training tests use one small config (`small_config`) so that the compiled programs are
shared through a persistent JAX compilation cache (one directory per test session, also
handed to subprocesses): XLA:CPU compiles of even a tiny Strip-MLP take tens of seconds.
"""

import atexit
import os
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CACHE_ENV = "STRIP_MLP_TEST_JAX_CACHE"
if _CACHE_ENV not in os.environ:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="strip_mlp_jax_cache_")
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
CACHE_DIR = os.environ[_CACHE_ENV]
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    _CACHE_ENV: CACHE_DIR,
}

TOTAL_STEPS = 60  # schedule length of every test run (runs stop early with stop_at_step)

# The config of the multi-device tests: the default model without blocks (stem, merging
# and cross-stage convolutions, BatchNorm, head: a quick compile), mixup/cutmix on,
# parameters and optimizer state sharded over pairs of devices (FSDP). Adam's eps is
# raised so that the update is a smooth function of the gradient: with eps=1e-8 the first
# updates are lr * sign(g), which turns float rounding of near-zero gradients (summed in
# another order on 8 devices) into differences of a whole lr step.
MINI = {
    "model.layers": (0, 0, 0, 0),
    "data.mixup_alpha": 0.8,
    "data.cutmix_alpha": 1.0,
    "optimizer.eps": 1e-3,
    "lr.warmup": 1e-3,
    "mesh.fsdp": 2,
}


def enable_compilation_cache():
  """Persistent compilation cache for this process (before anything is compiled)."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_logs():
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)


def small_config(**overrides):
  """configs/default.py (16-wide, 1 block per stage, digits 32 px, batch 64), 60 steps,
  logging every step; `overrides` are 'a.b' -> value."""
  from configs import default  # pylint: disable=g-import-not-at-top

  c = default.get_config()
  c.num_steps = TOTAL_STEPS
  c.log_every_steps = 1
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def config_args(**overrides):
  """The command-line flags that turn configs/default.py into small_config(**overrides)."""
  args = [f"--config.num_steps={TOTAL_STEPS}", "--config.log_every_steps=1"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def read_metrics(workdir, kind="train"):
  import json  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["kind"] == kind]


def simulated_hosts_iterator(num_hosts):
  """train_iterator_fn giving, in one process, the global batches that `num_hosts` processes
  build together: the hosts' local batches (each read as that process would) concatenated
  in process order, which is how the mesh lays them out."""

  def make(config, batch_size, sharding, seed, start_step):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top

    iters = [
        pipeline.create_train_iterator(
            config.data,
            batch_size,
            None,
            seed,
            start_step=start_step,
            process_index=i,
            process_count=num_hosts,
        )
        for i in range(num_hosts)
    ]
    while True:
      parts = [next(it) for it in iters]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      yield pipeline.to_global_arrays(batch, sharding)

  return make


def dataset_info(num_classes, num_train=1000, num_eval=100, name="synthetic"):
  """What `build` needs of a dataset, for steps run on synthetic batches."""
  import types  # pylint: disable=g-import-not-at-top

  return types.SimpleNamespace(
      name=name, num_train=num_train, num_eval=num_eval, num_classes=num_classes
  )
