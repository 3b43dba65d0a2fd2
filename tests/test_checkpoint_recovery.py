"""Damaged training checkpoints: the newest intact step is resumed, damaged ones are kept as
`<step>.damaged` (byte for byte) out of orbax's reach, and with none intact nothing changes.

Real orbax checkpoints are written and then damaged on disk as a full disk, a killed copy
or a bad sector leaves them (see `damage`); nothing is mocked.
"""

import glob
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_test_utils  # noqa: F401,E402  (the session's compilation cache)

from strip_mlp.checkpoints import checkpoint_recovery  # noqa: E402
from strip_mlp.checkpoints.checkpoint_recovery import find_resume_point  # noqa: E402
from strip_mlp.errors import CheckpointDamagedError, CheckpointMismatchError  # noqa: E402
from strip_mlp.checkpoints.train_checkpoint import Checkpointer  # noqa: E402


def _state(step):
  return {
      "w": jnp.arange(4096, dtype=jnp.float32) * step,
      "b": {"x": jnp.full((64, 64), float(step))},
  }


def _target():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), _state(0)
  )


def _write(directory, steps=(1, 2, 3), metrics_at=(2, 3)):
  ckpt = Checkpointer(directory, keep=5, async_save=False)
  for s in steps:
    ckpt.save(s, _state(s), {"note": s}, {"top1": 0.1 * s} if s in metrics_at else None)
  ckpt.close()


def damage(step_dir, how):
  """Damages the files of `step_dir` in place, as `how` says."""
  data = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert data, os.listdir(step_dir)
  if how == "truncated":  # a full disk / a copy cut short
    for f in data:
      os.truncate(f, os.path.getsize(f) // 2)
  elif how == "missing_data":
    for f in data:
      os.remove(f)
  elif how == "garbled_data":
    for f in data:
      with open(f, "rb") as fh:
        flipped = bytes(255 - b for b in fh.read())
      with open(f, "wb") as fh:
        fh.write(flipped)
  elif how == "no_commit_marker":  # a step folder copied without its last files
    os.remove(os.path.join(step_dir, "commit_success.txt"))
    os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  elif how == "empty_step_dir":
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
  else:  # garbled_<relative path of a JSON file>
    with open(os.path.join(step_dir, how[len("garbled_") :]), "w") as f:
      f.write('{"trunc')


def snapshot(root):
  """{relative path: (kind, bytes' sha1)} of everything under `root`."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = ("dir", None)
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = ("file", hashlib.sha1(f.read()).hexdigest())
  return out


DAMAGES = {  # how -> what the warning must say about it
    "truncated": "is truncated (",
    "missing_data": "is missing (",
    "garbled_data": "is corrupt (",
    "no_commit_marker": "it has no commit marker (commit_success.txt)",
    "empty_step_dir": "it has no commit marker",
    "garbled__CHECKPOINT_METADATA": "_CHECKPOINT_METADATA is not valid JSON",
    "garbled_meta/metadata": "meta/metadata is not valid JSON",
    "garbled_state/_METADATA": "state/_METADATA is not valid JSON",
    "garbled_metrics/metrics": "metrics/metrics is not valid JSON",
}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_damaged_newest_step_falls_back_and_is_kept(tmp_path, how):
  directory = str(tmp_path / "checkpoints")
  _write(directory)
  damage(os.path.join(directory, "3"), how)
  damaged_files = snapshot(os.path.join(directory, "3"))

  point = find_resume_point(directory, _target())

  assert point.step == 2 and point.meta["note"] == 2
  np.testing.assert_array_equal(point.state["w"], np.arange(4096) * 2)
  assert "\n" not in point.warning and point.warning.startswith("warning: checkpoint step 3 ")
  assert DAMAGES[how] in point.warning, point.warning
  assert point.warning.endswith("resuming from step 2, the newest intact one"), point.warning
  kept = os.path.join(directory, "3.damaged")
  assert f"kept it as {kept} " in point.warning
  assert snapshot(kept) == damaged_files  # the evidence, byte for byte
  assert not os.path.exists(os.path.join(directory, "3"))

  # The run goes on: orbax lists only intact steps, step 3 is saved afresh, and pruning
  # (keep=2) never touches the kept folder.
  ckpt = Checkpointer(directory, keep=2, keep_best=False, async_save=False)
  assert ckpt.all_steps() == [1, 2]
  for s in (3, 4, 5):
    assert ckpt.save(s, _state(s), {"note": s})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["3.damaged", "4", "5"]
  assert snapshot(kept) == damaged_files


def test_several_damaged_steps_are_named_in_one_line(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _write(directory, steps=(1, 2, 3, 4))
  damage(os.path.join(directory, "4"), "truncated")
  damage(os.path.join(directory, "3"), "no_commit_marker")
  damage(os.path.join(directory, "1"), "garbled_meta/metadata")  # older than the resumed
  os.mkdir(os.path.join(directory, "3.damaged"))  # an earlier fall-back kept one already

  point = find_resume_point(directory, _target())

  assert point.step == 2
  assert "\n" not in point.warning
  assert "step 4: state/" in point.warning and "is truncated" in point.warning
  assert "step 3: it has no commit marker" in point.warning
  assert "step 1: meta/metadata is not valid JSON" in point.warning
  assert sorted(os.listdir(directory)) == [
      "1.damaged",
      "2",
      "3.damaged",
      "3.damaged-2",
      "4.damaged",
  ]


def test_no_intact_step_stops_in_one_line_and_changes_nothing(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _write(directory, steps=(1, 2))
  damage(os.path.join(directory, "2"), "truncated")
  damage(os.path.join(directory, "1"), "no_commit_marker")
  os.mkdir(os.path.join(directory, "3.orbax-checkpoint-tmp"))  # a save cut short
  before = snapshot(str(tmp_path))

  with pytest.raises(CheckpointDamagedError) as e:
    find_resume_point(directory, _target())

  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"no intact checkpoint in {directory} (step 2: state/")
  assert "step 1: it has no commit marker" in message
  assert "nothing was changed" in message and "another --workdir" in message
  assert snapshot(str(tmp_path)) == before


def test_unfinished_save_is_named_and_left_to_orbax(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _write(directory, steps=(1, 2))
  shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp"))

  point = find_resume_point(directory, _target())

  assert point.step == 2
  assert point.warning == (
      "warning: the save of step 3 did not finish (its partial .orbax-checkpoint-tmp files "
      "are deleted); resuming from step 2"
  )
  Checkpointer(directory).close()  # orbax deletes unfinished saves when a run opens it
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_intact_checkpoints_resume_without_a_warning(tmp_path):
  directory = str(tmp_path / "checkpoints")
  assert find_resume_point(directory, _target()).step is None  # no directory yet
  _write(directory)
  before = snapshot(directory)
  point = find_resume_point(directory, _target())
  assert point.step == 3 and point.warning is None
  assert snapshot(directory) == before


def test_a_step_of_another_model_is_refused_not_set_aside(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _write(directory)
  damage(os.path.join(directory, "3"), "truncated")
  before = snapshot(directory)

  def check(where, meta, tree):
    raise CheckpointMismatchError(f"checkpoint {where} was written for model {meta['note']}")

  with pytest.raises(CheckpointMismatchError, match="checkpoints/2 was written for model 2"):
    find_resume_point(directory, _target(), check)
  assert snapshot(directory) == before


def test_committed_step_of_older_orbax_has_no_commit_file(tmp_path):
  """orbax < 0.12 marks a commit on local disks only by the rename and the commit time in
  _CHECKPOINT_METADATA: such a step is intact."""
  directory = str(tmp_path / "checkpoints")
  _write(directory, steps=(1,))
  os.remove(os.path.join(directory, "1", "commit_success.txt"))
  with open(os.path.join(directory, "1", "_CHECKPOINT_METADATA")) as f:
    assert json.load(f)["commit_timestamp_nsecs"]
  assert checkpoint_recovery.file_problem(os.path.join(directory, "1")) is None
  assert find_resume_point(directory, _target()).step == 1
