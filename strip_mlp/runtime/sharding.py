"""Device mesh and partitioning for training on 1 CPU ... a TPU pod with the same code.

The mesh has two axes over all devices of all processes:
  'data' -- pure data parallelism (parameters replicated along it);
  'fsdp' -- data parallelism that also shards parameters and optimizer state
            (ZeRO-3 / FSDP style): size 1 (the default) means everything is replicated.
The batch is split over both axes, so every device holds batch / device_count examples.
BatchNorm statistics inside a jitted step are then means over the global batch: XLA
inserts the cross-device reductions.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from strip_mlp.errors import DistributedSetupError
from strip_mlp.runtime.supervisor import cluster_env_detected

try:  # jax >= 0.5: say that the axes are sharded automatically (jax.make_mesh's default
  from jax.sharding import AxisType  # became Explicit); older jax has only automatic axes.
except ImportError:  # pragma: no cover
  AxisType = None

DATA_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated under FSDP (sharding them costs more than it saves).
FSDP_MIN_SIZE = 2**12
# Seconds without a heartbeat after which JAX's distributed runtime counts a process as dead
# and stops all others (JAX's own default is 100).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
_heartbeat_timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S


def _check_process_flags(coordinator_address, num_processes, process_id, cluster: bool):
  """DistributedSetupError (one line) for flag combinations jax.distributed cannot use."""
  flags = " ".join(
      f"--{k}={v}"
      for k, v in (
          ("coordinator_address", coordinator_address),
          ("num_processes", num_processes),
          ("process_id", process_id),
      )
      if v is not None
  )
  if num_processes is not None and num_processes < 1:
    raise DistributedSetupError(f"--num_processes={num_processes} must be >= 1")
  if cluster:
    return  # SLURM / Open MPI / TPU pods / a launcher provide what is missing
  if process_id is not None and num_processes is None and coordinator_address is None:
    raise DistributedSetupError(
        f"{flags}: --process_id needs --num_processes and " "--coordinator_address"
    )
  if coordinator_address is None and (num_processes or 1) > 1:
    raise DistributedSetupError(
        f"{flags}: a multi-process run needs --coordinator_address=HOST:PORT (process 0's "
        "host and a free port, the same for every process) with --num_processes and "
        "--process_id, unless SLURM, Open MPI or a TPU pod sets them"
    )
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedSetupError(
          f"--coordinator_address={coordinator_address} must be " "HOST:PORT, e.g. 10.0.0.1:1234"
      )
    if num_processes is None or process_id is None:
      raise DistributedSetupError(
          f"{flags}: give --num_processes=N and --process_id=i (in "
          "[0, N)) with --coordinator_address (or JAX_NUM_PROCESSES "
          "and JAX_PROCESS_ID with JAX_COORDINATOR_ADDRESS)"
      )
  if process_id is not None and num_processes is not None and not (0 <= process_id < num_processes):
    raise DistributedSetupError(
        f"--process_id={process_id} must be in [0, {num_processes}) "
        f"(--num_processes={num_processes})"
    )


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> bool:
  """Calls `jax.distributed.initialize` when several processes run; returns whether it did.

  Explicit arguments win; otherwise a cluster environment is detected (SLURM, Open MPI,
  Cloud TPU pods, or JAX_COORDINATOR_ADDRESS set by a launcher) and JAX reads it. A single
  plain process does nothing. A launcher may also set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. Must run before anything touches a JAX device. A
  process that sends no heartbeat for `heartbeat_timeout_seconds` counts as dead: JAX's
  runtime then ends every other process (strip_mlp/runtime/supervisor.py: how train.py says so).
  Raises DistributedSetupError (one line) for incomplete flags or a failed start.
  """
  global _heartbeat_timeout_s
  env = os.environ
  explicit = coordinator_address is not None or (num_processes or 1) > 1 or process_id is not None
  cluster = cluster_env_detected(env)
  detected = cluster or bool(env.get("JAX_COORDINATOR_ADDRESS"))
  if not (explicit or detected):
    return False
  kwargs = {}
  if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
    num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0")) or None
    if process_id is None and env.get("JAX_PROCESS_ID"):
      process_id = int(env["JAX_PROCESS_ID"])
  _check_process_flags(coordinator_address, num_processes, process_id, cluster)
  if num_processes == 1 and coordinator_address is None and not cluster:
    return False  # --num_processes=1 --process_id=0: one plain process
  if heartbeat_timeout_seconds < 1:
    raise DistributedSetupError(
        f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds} must be >= 1 (seconds)"
    )
  if coordinator_address is not None:
    kwargs.update(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  _heartbeat_timeout_s = heartbeat_timeout_seconds
  kwargs.update(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    raise DistributedSetupError(
        f"jax.distributed.initialize failed: {first}; check the "
        "coordinator address and that every process was started"
    )
  return True


def enable_compilation_cache(directory: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` (None or '': off).

  A rerun (resuming, eval.py after train.py) then reads the compiled XLA programs instead
  of compiling them again. Returns the directory, or None when it is off or cannot be
  created (the run goes on without the cache).
  """
  if not directory:
    return None
  directory = os.path.expanduser(directory)
  if "://" not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError:
      return None
    if not os.access(directory, os.W_OK):
      return None
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def await_verdict_after_error(grace_s: float = 10.0) -> None:
  """After an unexpected error in a multi-process run, before it is reported: waits until
  every process gets here too (they failed alike; returns) or JAX's runtime finds a dead
  process (it then ends this one, and train.py's supervisor says which process died), at
  most the heartbeat timeout plus `grace_s` (then returns). A collective whose peer died
  fails here at once, long before the runtime knows who died. No-op in one process."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = getattr(distributed.global_state, "client", None)
  if client is None:
    return
  try:
    client.wait_at_barrier(
        "strip_mlp_unexpected_error", int((_heartbeat_timeout_s + grace_s) * 1000)
    )
  except Exception as e:  # pylint: disable=broad-except
    if "DEADLINE_EXCEEDED" not in str(e):  # it failed: the runtime's verdict is near
      time.sleep(grace_s)


def barrier(name: str):
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  multihost_utils.sync_global_devices(name)


def create_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes).

  fsdp: size of the parameter-sharding axis; must divide the device count. Devices are
  ordered by process so that each process's devices are contiguous along the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the number of devices ({n})")
  devices.sort(key=lambda d: (d.process_index, d.id))
  grid = np.array(devices, dtype=object).reshape(n // fsdp, fsdp)
  if AxisType is None:  # pragma: no cover
    return Mesh(grid, DATA_AXES)
  return Mesh(grid, DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """PartitionSpec sharding the largest dimension divisible by `fsdp_size` over 'fsdp'.

  Leaves that are small, scalar or have no divisible dimension are replicated.
  """
  if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs (train state, params, ...).

  Parameters and the optimizer moments, which have the same shapes, get the same specs.
  """
  size = mesh.shape["fsdp"]

  def one(leaf):
    return NamedSharding(mesh, fsdp_spec(tuple(getattr(leaf, "shape", ())), size))

  return jax.tree_util.tree_map(one, abstract_tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (targets for checkpoint restore)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
  )


def put_global(tree: Any, shardings: Any) -> Any:
  """Host numpy trees (identical on every process) -> global arrays with `shardings` (a
  tree of shardings, or one sharding for every leaf)."""

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: one(x, shardings), tree)
  return jax.tree_util.tree_map(one, tree, shardings)


def batch_axis_sharding(sharding, ndim: int):
  """`sharding` restricted to the batch dimension, for arrays of any rank."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) or (None,)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))
  return sharding


def to_global_arrays(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded over the batch dimension."""
  return {
      k: jax.make_array_from_process_local_data(batch_axis_sharding(sharding, np.ndim(v)), v)
      for k, v in local_batch.items()
  }


def device_iterator(local_iter, sharding, prefetch: int) -> Iterator[dict[str, Any]]:
  """Puts `prefetch` batches on device ahead of the consumer (sharding None: numpy out)."""
  if sharding is None:
    yield from local_iter
    return
  queue = collections.deque()
  for batch in local_iter:
    queue.append(to_global_arrays(batch, sharding))
    if len(queue) > max(0, int(prefetch)):
      yield queue.popleft()
  while queue:
    yield queue.popleft()
