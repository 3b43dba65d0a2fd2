"""Checkpoint manager: round trip, retention, crash safety, resharding,
failed saves (one line, the previous checkpoint stays the latest), when a save is committed,
and the orbax log noise that is silenced."""

import asyncio
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.serialization import serialization

import train_test_utils  # noqa: E402

from strip_mlp.runtime import sharding  # noqa: E402
from strip_mlp.checkpoints import storage_errors  # noqa: E402
from strip_mlp.errors import CheckpointMismatchError, CheckpointSaveError  # noqa: E402
from strip_mlp.train.steps import TrainState  # noqa: E402
from strip_mlp.checkpoints.train_checkpoint import Checkpointer  # noqa: E402
from strip_mlp.errors import UserError  # noqa: E402


def _state(mesh, scale=1.0):
  """A small TrainState with an optax AdamW state, laid out on `mesh` (fsdp specs)."""
  params = {
      "dense": {
          "kernel": scale * jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128),
          "bias": scale * jnp.ones(128),
      }
  }
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = TrainState(
      step=jnp.array(7, jnp.int32),
      params=params,
      batch_stats={"bn": {"mean": jnp.zeros(4)}},
      opt_state=tx.init(params),
      ema={},
  )
  shardings = sharding.tree_shardings(state, mesh)
  return jax.device_put(state, shardings), shardings


def _abstract(state, shardings):
  return sharding.with_shardings(jax.eval_shape(lambda: state), shardings)


def test_round_trip_and_restore_on_other_device_counts(tmp_path):
  mesh8 = sharding.create_mesh(fsdp=jax.device_count())  # params split over all devices
  state, shardings = _state(mesh8)
  assert state.params["dense"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.save(7, state, {"best_top1": 0.5})
  assert not ckpt.save(7, state, {})  # same step: skipped, no error
  ckpt.close()
  for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices()[:4], 2)):
    mesh = sharding.create_mesh(fsdp, devices)
    _, new_shardings = _state(mesh)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.latest_step() == 7
    restored, meta = ckpt.restore(7, _abstract(state, new_shardings))
    ckpt.close()
    assert meta["step"] == 7 and meta["best_top1"] == 0.5
    assert restored.params["dense"]["kernel"].sharding == new_shardings.params["dense"]["kernel"]
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state
    )


def test_keeps_last_k_and_the_best(tmp_path):
  state, _ = _state(sharding.create_mesh(1, jax.devices()[:1]))
  ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=True)
  top1 = {2: 0.9, 4: 0.5, 6: 0.6}  # the best (0.9) is old
  for step in range(1, 7):
    ckpt.save(step, state, {}, {"top1": top1[step]} if step in top1 else None)
    ckpt.wait()
  ckpt.close()
  assert Checkpointer(str(tmp_path), keep=2).all_steps() == [2, 5, 6]


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, jax.numpy as jnp
    sys.path.insert(0, {repo!r})
    from strip_mlp.checkpoints.train_checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    big = {{"w": jnp.asarray(np.random.RandomState(0).randn(4096, 4096).astype(np.float32))}}
    ckpt.save(1, {{"w": jnp.ones(3)}}, {{}})
    ckpt.wait()
    ckpt.save(2, big, {{}})      # asynchronous: returns while the files are being written
    os._exit(0)                  # the process dies mid-save
""")


def test_crash_mid_save_is_never_resumed(tmp_path):
  directory = str(tmp_path / "ckpt")
  script = _CRASH_SCRIPT.format(repo=train_test_utils.REPO)
  subprocess.run(
      [sys.executable, "-c", script, directory],
      check=True,
      timeout=120,
      env={**os.environ, "XLA_FLAGS": ""},
      capture_output=True,
  )
  leftovers = [n for n in os.listdir(directory) if n.startswith("2")]
  assert leftovers and all("tmp" in n for n in leftovers), os.listdir(directory)
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  restored, _ = ckpt.restore(1, target)
  np.testing.assert_array_equal(restored["w"], np.ones(3))
  ckpt.close()
  assert not any(n.startswith("2") for n in os.listdir(directory))  # cleaned up on open


def test_mismatched_checkpoint_says_what_to_do(tmp_path):
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  state, shardings = _state(mesh)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(7, state, {"model": {"embed_dim": 16, "layers": [1, 1, 1, 1]}})
  ckpt.wait()
  other, other_shardings = _state(mesh)
  other = other.replace(params={"dense": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}})
  with pytest.raises(
      CheckpointMismatchError,
      match=r"dense/kernel is \(64, 128\) in the "
      r"checkpoint but \(64, 10\) now.*fresh --workdir",
  ):
    ckpt.check_compatible(7, jax.eval_shape(lambda: other))
  with pytest.raises(CheckpointMismatchError, match="embed_dim 16 in the checkpoint vs 32"):
    ckpt.check_compatible(7, _abstract(state, shardings), {"embed_dim": 32, "layers": [1] * 4})
  ckpt.check_compatible(7, _abstract(state, shardings), {"embed_dim": 16, "layers": [1] * 4})
  ckpt.close()


# ----------------------------------------------------------------------------- save failures


def _small(value=1.0):
  return {"w": jnp.full((64,), value)}


def _no_space(monkeypatch, directory, step):
  """Makes the array writes of checkpoint `step` fail like a full disk: OSError(ENOSPC) in
  the background commit of an async save, in save() of a sync one."""
  original = serialization.async_serialize_from_host

  async def write(rslices, spec, **kwargs):
    if f"{step}.orbax-checkpoint-tmp" in str(spec):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{directory}/{step}.orbax-...")
    return await original(rslices, spec, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", write)


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


@pytest.fixture
def absl_records():
  handler = _Records()
  logging.getLogger("absl").addHandler(handler)
  yield handler.records
  logging.getLogger("absl").removeHandler(handler)


@pytest.mark.parametrize("surface", ["sync_save", "wait", "next_save", "newly_committed", "close"])
def test_failed_save_is_one_line_and_the_previous_checkpoint_stays_latest(
    tmp_path, monkeypatch, absl_records, surface
):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, async_save=surface != "sync_save")
  assert ckpt.save(1, _small(1.0), {}) and ckpt.wait() == [1]
  _no_space(monkeypatch, directory, 2)
  with pytest.raises(CheckpointSaveError) as info:
    if surface == "sync_save":
      ckpt.save(2, _small(2.0), {})
    assert ckpt.save(2, _small(2.0), {})  # async: started, fails in the background
    if surface == "wait":
      ckpt.wait()
    elif surface == "next_save":
      ckpt.save(3, _small(3.0), {})
    elif surface == "newly_committed":
      for _ in range(600):
        assert ckpt.newly_committed() == []
        time.sleep(0.05)
    else:
      ckpt.close()
  message = str(info.value)
  assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
  assert "\n" not in message
  assert message.startswith(
      f"saving checkpoint step 2 in {directory} failed: no space left "
      "on device (the checkpoint needs about 256 bytes, "
  )
  assert (
      f"the previous checkpoint, step 1 ({directory}/1), is intact and a rerun resumes "
      "from it; free up space there" in message
  )
  assert [n for n in os.listdir(directory) if n.startswith("2")] in (
      [],
      ["2.orbax-checkpoint-tmp"],
  )  # never a final step 2
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  ckpt.close()  # no second error
  ckpt.close()
  assert not [r for r in absl_records if r.exc_info or r.levelno >= logging.ERROR]
  monkeypatch.undo()
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 1
  restored, _ = ckpt.restore(1, jax.eval_shape(lambda: _small()))
  np.testing.assert_array_equal(restored["w"], 1.0)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1"]  # the leftover went on that open


def test_failed_first_save_says_a_rerun_starts_from_scratch(tmp_path, monkeypatch):
  _no_space(monkeypatch, tmp_path, 5)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(
      CheckpointSaveError,
      match="step 5 .*there is no previous checkpoint, so " "a rerun starts from scratch",
  ):
    ckpt.save(5, _small(), {})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None
  ckpt.close()
  assert os.listdir(tmp_path) == []


def _blocked_meta_writes(monkeypatch):
  """Holds orbax's JSON writes (the `meta` item) until the returned event is set."""
  release = threading.Event()
  original = ocp.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    await asyncio.to_thread(release.wait, 60)
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)
  return release


def test_a_save_is_reported_committed_once_and_only_when_on_disk(tmp_path, monkeypatch):
  directory = tmp_path / "async"
  ckpt = Checkpointer(str(directory))
  release = _blocked_meta_writes(monkeypatch)
  assert ckpt.save(2, _small(), {"epoch": 1})
  time.sleep(0.5)
  assert ckpt.newly_committed() == []  # still being written
  assert not os.path.exists(directory / "2")
  release.set()
  for _ in range(600):
    committed = ckpt.newly_committed()
    if committed:
      break
    time.sleep(0.05)
  assert committed == [2]
  assert sorted(os.listdir(directory)) == ["2"]  # final, no temporary directory
  assert ckpt.read_meta(2)["epoch"] == 1
  assert ckpt.newly_committed() == [] and ckpt.wait() == []  # reported once
  assert ckpt.save(4, _small(), {}) and ckpt.wait() == [4]
  assert ckpt.save(6, _small(), {}) and ckpt.save(8, _small(), {})
  assert ckpt.wait() == [6, 8]  # save(8) waited for 6: both reported, oldest first
  ckpt.close()
  sync = Checkpointer(str(tmp_path / "sync"), async_save=False)
  assert sync.save(1, _small(), {}) and os.path.isdir(tmp_path / "sync" / "1")
  assert sync.newly_committed() == [1] and sync.newly_committed() == []
  sync.close()


def test_expected_orbax_warnings_are_not_logged(tmp_path, absl_records):
  filters = list(logging.getLogger("absl").filters)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _small(), {})  # no metrics
  ckpt.save(2, _small(), {}, {"top1": 0.5})
  ckpt.close()
  reader = Checkpointer(str(tmp_path), read_only=True)  # eval.py's way
  assert reader.latest_step() == 2 and reader.best_step() == 2
  reader.close()
  messages = [r.getMessage() for r in absl_records if r.levelno >= logging.WARNING]
  assert not messages, messages
  # the filters are gone with the checkpointers: the same warning elsewhere is kept
  assert logging.getLogger("absl").filters == filters
  logging.getLogger("absl").warning("Requested `tracked_metric`; did not provide metrics.")
  assert absl_records[-1].getMessage().startswith("Requested `tracked_metric`")


def test_closed_event_loop_errors_are_silenced_and_others_kept(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  storage_errors.quiet_closed_event_loop_errors()
  storage_errors.quiet_closed_event_loop_errors()  # once
  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError) as closed:
    loop.call_soon_threadsafe(print)  # what a late tensorstore write does
  other = RuntimeError("Event loop is closed")  # raised elsewhere: kept
  for e in (closed.value, other):
    sys.unraisablehook(
        types.SimpleNamespace(
            exc_type=type(e), exc_value=e, object=None, exc_traceback=e.__traceback__, err_msg=None
        )
    )
  assert [u.exc_value for u in seen] == [other]


_DISK_FULL_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np, jax.numpy as jnp
    sys.path.insert(0, {repo!r})
    from strip_mlp.checkpoints.train_checkpoint import Checkpointer
    from strip_mlp.errors import CheckpointSaveError
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {{"w": jnp.ones(3)}}, {{}})
    ckpt.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)         # writes past the limit fail: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    rs = np.random.RandomState(0)
    ckpt.save(2, {{f"w{{i}}": jnp.asarray(rs.randn(50000), jnp.float32) for i in range(100)}},
              {{}})
    try:
      ckpt.wait()
    except CheckpointSaveError as e:
      print(e)
    ckpt.close()
""")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_real_write_failure_in_tensorstore_is_one_line(tmp_path):
  """A file-size limit makes tensorstore's writes fail (as a full disk does, with the same
  errors and the same 'Event loop is closed' aftermath): one line, nothing else."""
  directory = str(tmp_path / "ckpt")
  script = _DISK_FULL_SCRIPT.format(repo=train_test_utils.REPO)
  res = subprocess.run(
      [sys.executable, "-c", script, directory],
      timeout=300,
      text=True,
      env={**os.environ, "XLA_FLAGS": ""},
      capture_output=True,
      check=False,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.startswith(
      f"saving checkpoint step 2 in {directory} failed: file too "
      "large (the checkpoint needs about 19.1 MiB"
  ), res.stdout
  assert "the previous checkpoint, step 1" in res.stdout
  assert "Traceback" not in res.stderr and "Event loop" not in res.stderr, res.stderr[-3000:]
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 1
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1"]
