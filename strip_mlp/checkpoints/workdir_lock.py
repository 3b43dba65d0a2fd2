"""One training run per workdir: WORKDIR/train.lock names the run that holds it.

    lock = workdir_lock.acquire(workdir)   # every process calls it; process 0 holds it
    try:
      ...                                  # train
    finally:
      lock.release()

The lock file is JSON: host, pid, start time, the process's start time in the kernel
(`pid_start`) and boot id, the number of processes of the run, and a random token. It is
created atomically (a complete temporary file hard-linked to the name, which fails when
the name exists, also on NFS), and refreshed (mtime) every HEARTBEAT_S by a thread.

A lock found in place is the holder's when the holder is alive:
  same host (hostname and boot id): its pid runs, is not a zombie and started when the
    lock says (so a reused pid does not count);
  another host (a shared file system): the lock was refreshed within STALE_AFTER_S.
A live holder: WorkdirBusyError, one line naming host, pid and start time; nothing is
written. A dead one: the lock is taken over with a one-line warning (stdout).

Multi-process runs share one workdir: process 0 takes the lock for the whole run (it names
the process count) and broadcasts the outcome, so every process stops when it is refused.
Remote workdirs (gs://...) are not locked. Two runs taking over the same dead lock within
microseconds of each other could both succeed; a double-submitted job is not that.
Released on return, on errors and Ctrl-C (`release`, atexit) and on SIGTERM before the
training loop's own handler is installed (`release_on_sigterm`).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import threading
import time
import uuid

from strip_mlp.errors import UserError

LOCK_FILE = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_HELD: list["WorkdirLock"] = []


class WorkdirBusyError(UserError, RuntimeError):
  """Another live run holds the workdir; the message names it and what to do."""


class WorkdirLock:
  """The lock this process holds on `path` (None: held by process 0 or not locked)."""

  def __init__(self, path: str | None = None, token: str | None = None):
    self.path, self.token = path, token
    self.warning: str | None = None  # the take-over line, printed by acquire
    self._stop = threading.Event()
    if path:
      threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True).start()

  def _heartbeat(self):
    path, token = self.path, self.token  # release() clears self.path
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if _read(path).get("token") != token:
          return  # taken over (after looking dead): never touch another run's lock
        os.utime(path)
      except OSError:
        return

  def release(self):
    """Removes the lock file if it is still this run's. Idempotent."""
    self._stop.set()
    if self in _HELD:
      _HELD.remove(self)
    if self.path and _read(self.path).get("token") == self.token:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self.path = None


def acquire(workdir: str) -> WorkdirLock:
  """Takes `workdir`'s lock on process 0 (see the module doc); collective. Raises
  WorkdirBusyError on every process when a live run holds it."""
  import jax  # pylint: disable=g-import-not-at-top

  lock, error = WorkdirLock(), None
  if jax.process_index() == 0 and "://" not in workdir:
    try:
      lock = _acquire_local(os.path.join(workdir, LOCK_FILE), jax.process_count())
    except Exception as e:  # pylint: disable=broad-except  (told to all processes, re-raised)
      error = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = WorkdirBusyError(
          f"--workdir {workdir}: process 0 did not get the run's lock (its error says why)"
      )
  if error is not None:
    lock.release()
    raise error
  if lock.warning:
    print(lock.warning, flush=True)
  return lock


def release_all():
  """Releases every lock this process holds (before os._exit, at exit)."""
  for lock in list(_HELD):
    lock.release()


def release_on_sigterm():
  """SIGTERM (until the training loop installs its own handler) releases the locks, then
  ends the process as SIGTERM does by default."""

  def handler(signum, frame):
    del frame
    release_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

  signal.signal(signal.SIGTERM, handler)


def _acquire_local(path: str, num_processes: int) -> WorkdirLock:
  """Creates the lock file `path`, taking over a dead holder's (with `warning` set)."""
  token = uuid.uuid4().hex
  me = _identity(os.getpid())
  me.update(
      started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      processes=num_processes,
      token=token,
  )
  warning = None
  for _ in range(3):
    if _create(path, me):
      lock = WorkdirLock(path, token)
      lock.warning = warning
      _HELD.append(lock)
      return lock
    holder = _read(path)
    if not holder and not os.path.exists(path):
      continue  # released just now
    why_dead = _why_dead(path, holder)
    if why_dead is None:
      raise WorkdirBusyError(_busy_message(path, holder))
    if _read(path).get("token") == holder.get("token"):  # still the one judged dead
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
    warning = f"warning: took over {path} from a run that is gone ({_describe(holder)}: {why_dead})"
  raise WorkdirBusyError(f"cannot take the lock {path}: other runs keep taking it")


def _create(path: str, content: dict) -> bool:
  """Atomically creates `path` holding `content`; False when it exists."""
  tmp = f"{path}.{content['token']}.tmp"
  with open(tmp, "w") as f:
    json.dump(content, f)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # a file system without hard links: exclusive create (not atomic content)
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(content, f)
    return True
  finally:
    os.remove(tmp)


def _read(path: str) -> dict:
  """The lock's JSON ({} when it is missing or unreadable)."""
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def _identity(pid: int) -> dict:
  """host, pid, boot id and the process's start time (clock ticks since boot; Linux)."""
  out = {"host": socket.gethostname(), "pid": pid, "boot_id": None, "pid_start": None}
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      out["boot_id"] = f.read().strip()
  except OSError:
    pass
  stat = _proc_stat(pid)
  if stat:
    out["pid_start"] = int(stat[19])
  return out


def _proc_stat(pid: int) -> list[str] | None:
  """/proc/<pid>/stat fields after the command name (state first); None if unavailable."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None


def _why_dead(path: str, holder: dict) -> str | None:
  """Why the holder of the lock at `path` is gone (a few words), None if it may be alive."""
  if not holder:  # never a lock being written: a lock appears complete (_create)
    return "unreadable lock file"
  me = _identity(os.getpid())
  if holder.get("host") != me["host"]:
    try:
      age = time.time() - os.path.getmtime(path)
    except OSError:
      return "its lock is gone"
    return f"its lock was last refreshed {age / 60:.0f} min ago" if age > STALE_AFTER_S else None
  if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
    return "the machine restarted since"
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return "unreadable lock file"
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return "no such process"
  except PermissionError:
    pass  # runs, as another user
  except (OSError, OverflowError, ValueError):
    return "no such process"
  stat = _proc_stat(pid)
  if stat and stat[0] in ("Z", "X"):
    return "the process has exited"
  if stat and holder.get("pid_start") is not None and int(stat[19]) != holder["pid_start"]:
    return "its pid now belongs to another process"
  return None


def _describe(holder: dict) -> str:
  """'host H, pid P, started T[, process 0 of N]' of a lock's JSON."""
  get = lambda key: holder.get(key, "?")
  text = f"host {get('host')}, pid {get('pid')}, started {get('started')}"
  if holder.get("processes", 1) > 1:
    text += f", process 0 of {holder['processes']}"
  return text


def _busy_message(path: str, holder: dict) -> str:
  return (
      f"--workdir {os.path.dirname(path)} is in use by another run ({_describe(holder)}); "
      f"wait for it to end or stop it, or use another --workdir (if that run is gone, "
      f"delete {path})"
  )


atexit.register(release_all)
