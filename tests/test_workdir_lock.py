"""The workdir lock on real files: who holds it, when a holder counts as gone (same host: a
pid that no longer runs, was reused or predates a reboot; another host: no heartbeat for
STALE_AFTER_S), the take-over line, the heartbeat, and release. The real train.py cases
(refused, stale lock taken over, SIGTERM) are in tests/test_workdir_faults.py."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from strip_mlp.checkpoints import workdir_lock  # noqa: E402
from strip_mlp.checkpoints.workdir_lock import WorkdirBusyError  # noqa: E402


def _write_lock(workdir, age_s=0.0, **fields):
  """A lock file as another run wrote it (this host and process unless `fields` say)."""
  holder = dict(workdir_lock._identity(os.getpid()))  # pylint: disable=protected-access
  holder.update({"started": "2026-01-02 03:04:05 UTC", "processes": 1, "token": "theirs"})
  holder.update(fields)
  path = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(path, "w") as f:
    json.dump(holder, f)
  then = time.time() - age_s
  os.utime(path, (then, then))
  return path


def _exited_pid():
  proc = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"],
      check=True,
      capture_output=True,
      text=True,
  )
  return int(proc.stdout)


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path))
  with open(tmp_path / workdir_lock.LOCK_FILE) as f:
    held = json.load(f)
  assert (held["host"], held["pid"], held["processes"]) == (socket.gethostname(), os.getpid(), 1)
  assert held["started"].endswith(" UTC") and lock.warning is None
  with pytest.raises(WorkdirBusyError) as e:  # a second run in this very process: alive
    workdir_lock.acquire(str(tmp_path))
  assert str(e.value) == (
      f"--workdir {tmp_path} is in use by another run (host {held['host']}, pid "
      f"{os.getpid()}, started {held['started']}); wait for it to end or stop it, or use "
      f"another --workdir (if that run is gone, delete {tmp_path}/train.lock)"
  )
  lock.release()
  lock.release()  # idempotent
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "fields,age_s,why",
    [
        ({"pid": "dead"}, 0, "no such process"),
        ({"pid_start": 1}, 0, "its pid now belongs to another process"),
        ({"boot_id": "another-boot"}, 0, "the machine restarted since"),
        (
            {"host": "elsewhere"},
            workdir_lock.STALE_AFTER_S + 60,
            "its lock was last refreshed 6 min ago",
        ),
    ],
)
def test_lock_of_a_gone_run_is_taken_over_with_one_line(tmp_path, capsys, fields, age_s, why):
  if fields.get("pid") == "dead":
    fields = {"pid": _exited_pid(), "pid_start": None}
  _write_lock(str(tmp_path), age_s, **fields)
  lock = workdir_lock.acquire(str(tmp_path))
  try:
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out == lock.warning + "\n"
    assert lock.warning.startswith(
        f"warning: took over {tmp_path}/train.lock from a run that is gone (host "
    )
    assert lock.warning.endswith(f", started 2026-01-02 03:04:05 UTC: {why})"), lock.warning
    with open(tmp_path / workdir_lock.LOCK_FILE) as f:
      assert json.load(f)["pid"] == os.getpid()
  finally:
    lock.release()


def test_live_run_on_another_host_keeps_its_lock(tmp_path):
  path = _write_lock(str(tmp_path), workdir_lock.STALE_AFTER_S - 60, host="elsewhere", processes=4)
  before = open(path).read()
  with pytest.raises(
      WorkdirBusyError, match=r"\(host elsewhere, pid \d+, started .*, process 0 of 4\)"
  ):
    workdir_lock.acquire(str(tmp_path))
  assert open(path).read() == before and os.listdir(tmp_path) == ["train.lock"]


def test_unreadable_lock_is_taken_over(tmp_path):
  with open(os.path.join(tmp_path, workdir_lock.LOCK_FILE), "w") as f:
    f.write("{garbage")
  lock = workdir_lock.acquire(str(tmp_path))
  assert lock.warning.endswith(": unreadable lock file)")
  lock.release()


def test_heartbeat_refreshes_the_lock_and_never_touches_a_taken_over_one(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  lock = workdir_lock.acquire(str(tmp_path))
  path = os.path.join(tmp_path, workdir_lock.LOCK_FILE)
  os.utime(path, (1.0, 1.0))
  deadline = time.time() + 30
  while os.path.getmtime(path) < time.time() - 60:
    assert time.time() < deadline, "the heartbeat did not refresh the lock"
    time.sleep(0.05)
  _write_lock(str(tmp_path), 600, token="someone else")  # taken over while we looked dead
  time.sleep(0.3)  # a heartbeat that read our token just before may touch it once, then stops
  os.utime(path, (time.time() - 600, time.time() - 600))
  time.sleep(0.5)
  assert os.path.getmtime(path) < time.time() - 500  # not refreshed
  lock.release()
  assert os.path.exists(path)  # not ours: left in place


def test_remote_workdirs_are_not_locked():
  lock = workdir_lock.acquire("gs://bucket/run")
  assert lock.path is None
  lock.release()
