"""A multi-process run ends with one line when one of its processes dies hard.

When a process of a multi-process run dies without a word (SIGKILL, the OOM killer, a host
that is gone), JAX's distributed runtime finds out: the coordination service misses its
heartbeats for --heartbeat_timeout_seconds (or, when the coordinator itself is gone, the
calls to it fail) and tells every other process, whose runtime then ends it with LOG(FATAL):
a C++ check-failure stack trace, a Python thread dump and exit code 134 (SIGABRT). jaxlib's
hook for that moment (get_distributed_runtime_client's missed_heartbeat_callback) cannot
call Python in jaxlib 0.10 (absl::Status has no Python conversion: std::bad_cast, then
std::terminate), so that ending cannot be changed inside the process.

`supervise` therefore runs a multi-process train.py as a child of a small parent (no JAX,
no TensorFlow): stdin/stdout are the child's own, its stderr passes through `StderrFilter`,
which holds C++/absl log records back for a moment and drops the runtime's fatal report
and everything after it. The parent then prints one line (which process stopped answering,
the last committed checkpoint, that a rerun resumes) and exits with EXIT_PEER_LOST. The
child reports what the line needs (its process index, the checkpoint directory, committed
steps) through a pipe: `report`. The child is in its own process group (Ctrl-C reaches it
once, through the parent); SIGINT and SIGTERM sent to the parent are forwarded; the child
is killed when the parent dies (PR_SET_PDEATHSIG), so a SIGKILL of the parent is a hard
death of that process for the others. Linux only; elsewhere runs are not supervised.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

ENV_FD = "STRIP_MLP_SUPERVISOR_FD"  # in the child: "<report pipe's write fd>:<parent pid>"
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: a rerun of the same command resumes
HOLD_S = 3.0  # how long log records wait for a fatal report before they are shown
FATAL_MARKERS = (b"JAX distributed service detected fatal errors",)
_LOG_RECORD = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\]\n]*\] ")
_RECORD_HEAD = b"X0000 00:00:00.000000"  # X: the level; 0: a digit
_PR_SET_PDEATHSIG = 1
_CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


# ----------------------------------------------------------------------------- who runs


def cluster_env_detected(env=os.environ) -> bool:
  """SLURM, Open MPI or a TPU pod with several processes."""
  sizes = (int(env.get(k, "1") or 1) for k in _CLUSTER_SIZES)
  return any(n > 1 for n in sizes) or "," in env.get("TPU_WORKER_HOSTNAMES", "")


def wants_several_processes(argv: list[str], env=os.environ) -> bool:
  """Whether the command line or the environment asks for a multi-process run (the flags
  --coordinator_address / --num_processes=N>1, JAX_COORDINATOR_ADDRESS, a cluster)."""
  values = {}
  for i, arg in enumerate(argv):
    for name in ("coordinator_address", "num_processes"):
      if arg == f"--{name}" and i + 1 < len(argv):
        values[name] = argv[i + 1]
      elif arg.startswith(f"--{name}="):
        values[name] = arg.split("=", 1)[1]
  num = values.get("num_processes", "")
  return bool(
      values.get("coordinator_address")
      or (num.isdigit() and int(num) > 1)
      or env.get("JAX_COORDINATOR_ADDRESS")
      or cluster_env_detected(env)
  )


def _report_fd() -> int | None:
  """The report pipe, in the supervised child itself only (not in processes it starts,
  which inherit the environment but not the pipe)."""
  fd, _, parent = os.environ.get(ENV_FD, "").partition(":")
  if not parent.isdigit() or int(parent) != os.getppid():
    return None
  return int(fd)


def is_child() -> bool:
  return _report_fd() is not None


def report(**fields) -> None:
  """Child: sends `fields` (JSON values) to the parent; nothing when not supervised."""
  fd = _report_fd()
  if fd is None:
    return
  try:
    os.write(fd, (json.dumps(fields) + "\n").encode())
  except OSError:
    pass  # the parent is gone (the child is being killed too) or the fd was closed


# ----------------------------------------------------------------------------- stderr


class StderrFilter:
  """The child's stderr, passed on as it comes, except log records (absl/glog lines such as
  `E1205 01:57:39.892 10122 file.cc:1520] ...`) and the lines after them: those wait up
  to HOLD_S seconds; if the runtime's fatal report (FATAL_MARKERS) arrives meanwhile, they
  and all later output are kept in `fatal_text` instead of shown.

  feed(data, now) and tick(now) return the bytes to write now; finish() the rest.
  Invariant: every byte fed is either returned exactly once, in order, or in fatal_text.
  """

  def __init__(self):
    self.fatal_text: bytes | None = None
    self._held = bytearray()  # log records (and what followed them) being held
    self._held_since = 0.0
    self._pending = b""  # an unfinished line that may be the start of a log record
    self._pending_since = 0.0
    self._line_start = True

  def feed(self, data: bytes, now: float) -> bytes:
    if self._pending:
      data, self._pending = self._pending + data, b""
    out = bytearray()
    while data:
      end = data.find(b"\n") + 1 or len(data)
      piece, data = data[:end], data[end:]
      complete = piece.endswith(b"\n")
      if self.fatal_text is not None:
        self.fatal_text += piece
      elif self._held or (self._line_start and _LOG_RECORD.match(piece)):
        self._hold(piece, now)
      elif self._line_start and not complete and _may_start_record(piece):
        self._pending, self._pending_since = piece, now
        break
      else:
        out += piece
      self._line_start = complete
    return bytes(out)

  def _hold(self, piece: bytes, now: float):
    if not self._held:
      self._held_since = now
    self._held += piece
    if any(m in self._held for m in FATAL_MARKERS):
      self.fatal_text, self._held = bytes(self._held), bytearray()

  def tick(self, now: float) -> bytes:
    """Releases records held longer than HOLD_S (no fatal report followed them)."""
    out = b""
    if self._held and now - self._held_since > HOLD_S:
      out, self._held = bytes(self._held), bytearray()
    if self._pending and now - self._pending_since > HOLD_S:
      out, self._pending, self._line_start = out + self._pending, b"", False
    return out

  def finish(self) -> bytes:
    if self.fatal_text is not None:
      return b""
    out = bytes(self._held) + self._pending
    self._held, self._pending = bytearray(), b""
    return out


def _may_start_record(piece: bytes) -> bool:
  """Whether an unfinished line could still turn out to be a log record."""
  head, rest = piece[: len(_RECORD_HEAD)], piece[len(_RECORD_HEAD) :]
  for c, t in zip(head, _RECORD_HEAD):
    if not (c in b"IWEF" if t == ord("X") else chr(c).isdigit() if t == ord("0") else c == t):
      return False
  return len(piece) < 300 and bool(re.fullmatch(rb"( +\d*( [^\]\n]*)?)?", rest))


# ----------------------------------------------------------------------------- the line


def lost_processes(fatal_text: str) -> list[int] | None:
  """The processes the runtime's fatal report names as gone; [0] when the coordinator
  (process 0, which runs the coordination service) stopped answering; None if unknown."""
  m = re.search(r"stopped sending heartbeats\):(.*?)(?:The tasks|\n\n|$)", fatal_text, re.S)
  if m:
    ids = [int(t) for t in re.findall(r"(\d+)\s*(?:\n|,|$)", m.group(1))]
    if ids:
      return sorted(set(ids))
  ids = re.findall(r"task:?\s*(\d+) heartbeat timeout", fatal_text, re.I)
  if ids:
    return sorted({int(t) for t in ids})
  if "leader task" in fatal_text or "Failed to send RPC to coordination service" in fatal_text:
    return [0]
  return None


def last_committed(status: dict) -> tuple[int | None, str | None]:
  """(step, checkpoint directory) of the newest committed checkpoint: the child's reports,
  and for a local directory its step folders (orbax renames a step's temporary folder to
  the bare step number only once all processes have written it)."""
  directory, step = status.get("checkpoints"), status.get("committed")
  if directory and "://" not in directory:
    try:
      steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    except OSError:
      steps = []
    step = max(steps + ([step] if step is not None else []), default=None)
  return step, directory


def resume_clause(status: dict) -> str:
  step, directory = last_committed(status)
  if step is not None:
    return (
        f"the last committed checkpoint is step {step} ({directory}/{step}): rerun the same "
        "command on all processes to resume from it"
    )
  if directory:
    return "no checkpoint was committed yet: rerun the same command on all processes to start again"
  return "rerun the same command on all processes to resume from the newest checkpoint"


def peer_lost_line(prog: str, fatal_text: str, status: dict) -> str:
  """The one line of a run stopped by the runtime's fatal report."""
  me, count = status.get("process"), status.get("processes")
  lost = lost_processes(fatal_text)
  this = f"process {me}" if me is not None else "this process"
  if lost is None:
    why = re.search(r"absl::Status: ([^\n]*)", fatal_text)
    reason = (why.group(1) if why else "a fatal error").strip()[:200]
    return f"{prog}: error: JAX's distributed runtime stopped {this} ({reason}); " + resume_clause(
        status
    )
  who = "process" + ("es " if len(lost) > 1 else " ") + ", ".join(map(str, lost))
  if count:
    who += f" of {count}"
  if lost == [0]:
    addr = status.get("coordinator")
    who += f" (the coordinator{', ' + addr if addr else ''})"
  return (
      f"{prog}: error: {who} stopped answering (killed, out of memory, or its host is gone), "
      f"so {this} stopped too; " + resume_clause(status)
  )


# ----------------------------------------------------------------------------- parent


def supervise(prog: str) -> None:
  """Runs this program as a supervised child and exits with its outcome when the command
  line asks for several processes (on Linux); returns at once otherwise."""
  if is_child() or not sys.platform.startswith("linux"):
    return
  if not wants_several_processes(sys.argv[1:]):
    return
  sys.exit(_run_child(prog))


def own_command() -> list[str]:
  """The command line that started this program: interpreter options (-u, -X) kept."""
  orig = list(getattr(sys, "orig_argv", []))
  if len(orig) > len(sys.argv) and orig[len(orig) - len(sys.argv) :] == sys.argv:
    return [sys.executable, *orig[1:]]  # keeps interpreter options such as -u or -X
  return [sys.executable, *sys.argv]


def _run_child(prog: str) -> int:
  read_fd, write_fd = os.pipe()
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork
  parent = os.getpid()

  def in_child():
    os.setpgid(0, 0)
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
      os._exit(128 + signal.SIGKILL)  # pylint: disable=protected-access

  child = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
      own_command(),
      stderr=subprocess.PIPE,
      pass_fds=(write_fd,),
      env={**os.environ, ENV_FD: f"{write_fd}:{parent}"},
      preexec_fn=in_child,
  )
  os.close(write_fd)
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda signum, _: child.send_signal(signum))
  filt, status = StderrFilter(), {}
  _pump(child.stderr.fileno(), read_fd, filt, status)
  rc = child.wait()
  _write(filt.finish())
  if filt.fatal_text is not None:
    _write((peer_lost_line(prog, filt.fatal_text.decode(errors="replace"), status) + "\n").encode())
    return EXIT_PEER_LOST
  if rc == -signal.SIGKILL:
    me = status.get("process")
    this = "this process" if me is None else f"process {me}"
    line = f"{prog}: error: {this} was killed (SIGKILL: out of memory, or by hand); "
    _write((line + resume_clause(status) + "\n").encode())
  return 128 - rc if rc < 0 else rc


def _pump(err_fd: int, status_fd: int, filt: StderrFilter, status: dict) -> None:
  """Passes the child's stderr through `filt` and collects its reports until both pipes
  close (the child ended), waiting at most 2 s for the reports once stderr has closed."""
  open_fds, partial, deadline = [err_fd, status_fd], b"", None
  while open_fds and (deadline is None or time.monotonic() < deadline):
    ready, _, _ = select.select(open_fds, [], [], 0.5)
    now = time.monotonic()
    for fd in ready:
      data = os.read(fd, 1 << 16)
      if not data:
        open_fds.remove(fd)
        deadline = now + 2.0 if fd == err_fd else deadline
      elif fd == err_fd:
        _write(filt.feed(data, now))
      else:
        *lines, partial = (partial + data).split(b"\n")
        for line in lines:
          try:
            status.update(json.loads(line))
          except ValueError:
            pass
    _write(filt.tick(now))
  os.close(status_fd)


def _write(data: bytes) -> None:
  while data:
    data = data[os.write(2, data) :]
