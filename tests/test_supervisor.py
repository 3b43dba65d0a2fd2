"""train.py's supervisor (strip_mlp/runtime/supervisor.py): the stderr filter, the one line, and
the parent/child plumbing, on a fake child that dies as JAX's runtime makes a survivor die
(no JAX here; tests/test_train_host_death.py runs the real thing)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from strip_mlp.runtime import supervisor

# What a survivor's runtime writes when process 1 stopped sending heartbeats (jaxlib 0.10.2,
# shortened), and when the coordinator (process 0) is gone.
HEARTBEAT_REPORT = (
    b"E1205 01:57:39.892320   10122 coordination_service.cc:1549] [175] Use error polling "
    b"to propagate the following error to all tasks: UNAVAILABLE: The following tasks are "
    b"unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed. Check the task "
    b"logs for an earlier error.\n"
    b"E1205 01:57:39.892417   10133 coordination_service_agent.cc:289] Polled an error "
    b"from coordination service (this can be an error from this or another task).\n"
    b"F1205 01:57:39.892574   10133 client.h:80] Terminating process because the JAX "
    b"distributed service detected fatal errors. This most likely indicates that another "
    b"task died; see the other task logs for more details. absl::Status: UNAVAILABLE: The "
    b"following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have "
    b"crashed.\n*** Check failure stack trace: ***\n    @     0x7f5177040634  absl::"
    b"LogMessage::SendToLog()\nFatal Python error: Aborted\n\nThread 0x00007f (most recent "
    b"call first):\n"
)
COORDINATOR_REPORT = (
    "F1205 02:00:28.496991   16931 client.h:80] Terminating process because the JAX "
    "distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send "
    "RPC to coordination service. Either the leader task was preempted/died/restarted "
    "unexpectedly or this task is experiencing network issues.\n"
)


def test_filter_passes_output_through_at_once():
  f = supervisor.StderrFilter()
  assert f.feed(b"train.py: note\nGenerating 50%\r", 0.0) == b"train.py: note\nGenerating 50%\r"
  assert f.feed(b"Generating 100%\n", 0.1) == b"Generating 100%\n"
  assert f.finish() == b"" and f.fatal_text is None


def test_filter_shows_log_records_that_no_fatal_report_follows():
  f = supervisor.StderrFilter()
  record = b"W1205 01:57:39.892320   10122 file.py:12] a warning\n"
  assert f.feed(record[:9], 0.0) == b""  # maybe a record: wait for the line
  assert f.feed(record[9:] + b"its second line\n", 0.5) == b""
  assert f.tick(0.5 + supervisor.HOLD_S / 2) == b""
  assert f.tick(1.0 + supervisor.HOLD_S) == record + b"its second line\n"
  assert f.feed(b"Info without a record prefix\n", 9.0) == b"Info without a record prefix\n"
  assert f.feed(b"E1", 9.0) == b""
  assert f.finish() == b"E1"  # the child ended: nothing is lost


def test_filter_drops_the_fatal_report_and_what_precedes_and_follows_it():
  f = supervisor.StderrFilter()
  out = f.feed(b"step output\n", 0.0)
  for i in range(0, len(HEARTBEAT_REPORT), 37):  # in pieces, as a pipe delivers it
    out += f.feed(HEARTBEAT_REPORT[i : i + 37], 1.0)
  out += f.tick(100.0) + f.feed(b"more after the abort\n", 100.0) + f.finish()
  assert out == b"step output\n"
  assert f.fatal_text == HEARTBEAT_REPORT + b"more after the abort\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        (HEARTBEAT_REPORT.decode(), [1]),
        (
            "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n2\n3\n"
            "The tasks have crashed.",
            [2, 3],
        ),
        ("UNAVAILABLE: Task 4 heartbeat timeout. This indicates", [4]),
        (COORDINATOR_REPORT, [0]),
        ("F1205 client.h:80] Terminating process ... absl::Status: INTERNAL: other", None),
    ],
)
def test_lost_processes(text, expected):
  assert supervisor.lost_processes(text) == expected


def test_peer_lost_line_names_the_process_and_the_newest_committed_step(tmp_path):
  for name in ("5", "10", "15.orbax-checkpoint-tmp-1234"):  # 15: not committed
    (tmp_path / name).mkdir()
  status = {"process": 0, "processes": 2, "checkpoints": str(tmp_path), "committed": 5}
  line = supervisor.peer_lost_line("train.py", HEARTBEAT_REPORT.decode(), status)
  assert line == (
      "train.py: error: process 1 of 2 stopped answering (killed, out of memory, or its host "
      "is gone), so process 0 stopped too; the last committed checkpoint is step 10 "
      f"({tmp_path}/10): rerun the same command on all processes to resume from it"
  )
  status = {"process": 1, "processes": 2, "coordinator": "h:1", "checkpoints": "gs://b/c"}
  line = supervisor.peer_lost_line("train.py", COORDINATOR_REPORT, dict(status, committed=20))
  assert "process 0 of 2 (the coordinator, h:1) stopped answering" in line
  assert "step 20 (gs://b/c/20)" in line
  line = supervisor.peer_lost_line("train.py", COORDINATOR_REPORT, status)
  assert line.endswith(
      "no checkpoint was committed yet: rerun the same command on all " "processes to start again"
  )


@pytest.mark.parametrize(
    "argv,env,expected",
    [
        (["--num_processes=2", "--process_id=0"], {}, True),
        (["--num_processes", "2"], {}, True),
        (["--coordinator_address=h:1"], {}, True),
        (["--num_processes=1"], {}, False),
        (["--workdir=/tmp/x"], {}, False),
        ([], {"JAX_COORDINATOR_ADDRESS": "h:1"}, True),
        ([], {"SLURM_NTASKS": "4"}, True),
        ([], {"SLURM_NTASKS": "1"}, False),
    ],
)
def test_wants_several_processes(argv, env, expected):
  assert supervisor.wants_several_processes(argv, env) == expected


def test_only_the_supervised_child_itself_reports(monkeypatch):
  read_fd, write_fd = os.pipe()
  try:
    monkeypatch.setenv(supervisor.ENV_FD, f"{write_fd}:{os.getppid() + 1}")  # a grandchild
    assert not supervisor.is_child()
    supervisor.report(step=1)
    monkeypatch.setenv(supervisor.ENV_FD, f"{write_fd}:{os.getppid()}")
    assert supervisor.is_child()
    supervisor.report(step=2)
    assert os.read(read_fd, 100) == b'{"step": 2}\n'
  finally:
    os.close(read_fd)
    os.close(write_fd)


# A program that is supervised like train.py: the child reports, then does what argv[1] says.
FAKE = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from strip_mlp.runtime import supervisor
    supervisor.supervise("fake.py")
    supervisor.report(process=0, processes=2, checkpoints={ckpt!r}, committed=3)
    what = sys.argv[1].split("=")[1]
    if what == "term":
      signal.signal(signal.SIGTERM, lambda *a: (print("saving", flush=True), sys.exit(0)))
    print("child", os.getpid(), flush=True)
    if what == "abort":
      sys.stderr.buffer.write({report!r})
      sys.stderr.flush()
      os.abort()
    time.sleep(60)
    """)


def _start(tmp_path, what):
  script = tmp_path / "fake.py"
  script.write_text(
      FAKE.format(
          repo=supervisor.__file__.rsplit("/strip_mlp/", 1)[0],
          ckpt=str(tmp_path / "ckpt"),
          report=HEARTBEAT_REPORT,
      )
  )
  proc = subprocess.Popen(
      [sys.executable, str(script), f"--coordinator_address={what}"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
  )
  child = int(proc.stdout.readline().split()[1])
  return proc, child


def test_a_child_ended_by_the_runtime_makes_one_line_and_exit_code_75(tmp_path):
  proc, _ = _start(tmp_path, "abort")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == supervisor.EXIT_PEER_LOST, err
  assert err.decode().splitlines() == [
      "fake.py: error: process 1 of 2 stopped answering (killed, out of memory, or its host "
      "is gone), so process 0 stopped too; the last committed checkpoint is step 3 "
      f"({tmp_path}/ckpt/3): rerun the same command on all processes to resume from it"
  ]


def test_sigterm_reaches_the_child_and_its_exit_code_is_the_parents(tmp_path):
  proc, child = _start(tmp_path, "term")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert (proc.returncode, out, err) == (0, b"saving\n", b"")
  assert not _alive(child)


def test_the_child_dies_with_the_parent(tmp_path):
  proc, child = _start(tmp_path, "sleep")
  proc.kill()
  proc.wait(timeout=60)
  deadline = time.time() + 10
  while _alive(child) and time.time() < deadline:
    time.sleep(0.05)
  assert not _alive(child), "the child outlived a SIGKILL of its parent"


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False
