"""What the three benchmarks share: flags, timing, medians, the table and the machine header.

Imports neither jax nor torch, so that worker processes load only the framework they time.

Timing: `interleave` runs each contender's step in turn (A B C A B C ...) after warm-up
steps, so that all see the same machine state; a shared machine's load then shifts all
contenders alike and the medians' ratio stays meaningful. `in_blocks` times each
contender's steps in a row instead (A A A B B B ..., twice), the steady state of a process
running alone.

Worker processes (one model each, see `Worker` and `serve`) speak one line per request on
stdin/stdout: the worker first prints one JSON object (its description, e.g. compile
times), then for each request line MODE prints the seconds one step of MODE took.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The flags the benchmarks share: one spelling and meaning for all of them.
_FLAGS = {
    "variants": dict(
        default="tiny_light", help="comma list of tiny_light, tiny, small, base (one row set each)"
    ),
    "batch_size": dict(default="16", help="comma list of batch sizes (one row set each)"),
    "image_size": dict(type=int, default=224, help="R: the model's input is R x R x 3"),
    "dtype": dict(default="float32", help="comma list of compute dtypes: float32, bfloat16"),
    "repeats": dict(type=int, default=5, help="timed steps per measurement (median reported)"),
    "warmup": dict(type=int, default=1, help="untimed steps after compiling"),
    "embed_dim": dict(type=int, default=None, help="custom size: overrides the variant's"),
    "layers": dict(default=None, help="custom depths, e.g. 1,1,1,1: overrides the variant's"),
    "json": dict(default=None, help="also write the header, flags and rows here as JSON"),
}
DTYPES = ("float32", "bfloat16")


def add_flags(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
  """Adds the shared flags `names` to `parser`; `defaults` overrides their defaults."""
  for name in names:
    spec = dict(_FLAGS[name])
    if name in defaults:
      spec["default"] = defaults[name]
    parser.add_argument("--" + name, **spec)


def int_list(text: str) -> list:
  """'16,64' -> [16, 64]."""
  return [int(t) for t in text.split(",") if t]


def str_list(text: str, choices=None) -> list:
  """'a,b' -> ['a', 'b'], each checked against `choices` if given."""
  items = [t for t in text.split(",") if t]
  for item in items:
    if choices is not None and item not in choices:
      raise SystemExit(f"{item!r} is not one of {', '.join(choices)}")
  return items


def timed(fn) -> callable:
  """A step that returns the seconds `fn()` took (`fn` must block until its work is done)."""

  def step():
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  return step


def interleave(steps: dict, repeats: int, warmup: int = 1, pause: float = 0.0) -> dict:
  """{name: [seconds] * repeats}: the steps run in turn, `warmup` untimed rounds first.

  steps: {name: callable returning the seconds its step took}. `pause` seconds separate
  consecutive steps (idle OpenMP/XLA threads of the previous one spin for a while).
  """
  times = {name: [] for name in steps}
  for round_ in range(warmup + repeats):
    for name, step in steps.items():
      seconds = step()
      if round_ >= warmup:
        times[name].append(seconds)
      if pause and len(steps) > 1:
        time.sleep(pause)
  return times


def in_blocks(steps: dict, repeats: int, warmup: int = 1, passes: int = 2) -> dict:
  """{name: [seconds] * (repeats * passes)}: each step `warmup` untimed then `repeats`
  timed times in a row, the contenders in turn, the whole sequence `passes` times.

  The steady state of one process running alone (as train.py does): with glibc's
  allocator, the step after another process's step page-faults its freed buffers afresh,
  which `interleave` charges to every step and this charges to the untimed warm-up.
  """
  times = {name: [] for name in steps}
  for _ in range(passes):
    for name, step in steps.items():
      for i in range(warmup + repeats):
        seconds = step()
        if i >= warmup:
          times[name].append(seconds)
  return times


def median(values) -> float:
  return float(statistics.median(values))


def markdown_table(rows: list, columns: list) -> str:
  """A markdown table: columns are (key, title) pairs; a missing or None value prints '-'."""
  lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = ["-" if row.get(key) is None else str(row[key]) for key, _ in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def allocator(environ=None) -> str:
  """The host allocator a process started with `environ` (default: this one's) gets."""
  env = os.environ if environ is None else environ
  preload = env.get("LD_PRELOAD", "")
  name = next((n for n in ("mimalloc", "tcmalloc") if n in preload), "glibc")
  if name == "glibc" and env.get("GLIBC_TUNABLES"):
    name += f" ({env['GLIBC_TUNABLES']})"
  return name


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "absent"


def machine_header(**extra) -> str:
  """One line: CPU, cores, load, framework versions, allocator, date, then `extra` items."""
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  versions = " ".join(f"{p}={_version(p)}" for p in ("jax", "jaxlib", "flax", "torch"))
  items = dict(
      cpu=_cpu_name(),
      cores=os.cpu_count(),
      load_1min=f"{load:.1f}",
      python=platform.python_version(),
      allocator=allocator(),
      date=time.strftime("%Y-%m-%d"),
  )
  items.update(extra)
  return (
      f"cpu={items.pop('cpu')!r} " + versions + " " + " ".join(f"{k}={v}" for k, v in items.items())
  )


def write_json(path: str, header: str, args: argparse.Namespace, rows: list) -> None:
  if path:
    with open(path, "w") as f:
      json.dump({"header": header, "args": vars(args), "rows": rows}, f, indent=2)


class Worker:
  """A model in a process of its own (see `serve`): `run(mode)` -> seconds of one step."""

  def __init__(self, name: str, cmd: list, environ=None):
    self.name = name
    self._proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ
    )
    first = self._proc.stdout.readline()
    try:
      self.info = json.loads(first)
    except ValueError:
      self._proc.kill()
      reason = first.strip() or "see the error above"
      raise SystemExit(f"{name}: the worker did not start ({reason})") from None
    if "error" in self.info:
      self._proc.kill()
      raise SystemExit(f"{name}: {self.info['error']}")

  def _ask(self, request: str) -> str:
    """Sends one request line and returns the reply line (a stopped worker: one-line exit)."""
    try:
      self._proc.stdin.write(request + "\n")
      self._proc.stdin.flush()
      reply = self._proc.stdout.readline()
    except BrokenPipeError:
      reply = ""
    if not reply:
      raise SystemExit(f"{self.name}: the worker stopped ({self._why_stopped()})")
    return reply

  def _why_stopped(self) -> str:
    code = self._proc.wait(timeout=60)
    if code == -9:
      return "killed, e.g. by the kernel when memory ran out: fewer models or a smaller batch"
    return f"exit code {code}; see the error above"

  def run(self, mode: str) -> float:
    return float(self._ask(mode))

  def query_info(self) -> dict:
    """The worker's `info` now (e.g. its peak memory after the steps)."""
    return json.loads(self._ask("info"))

  def close(self) -> None:
    try:
      self._proc.stdin.close()
    except BrokenPipeError:  # already stopped
      pass
    self._proc.wait(timeout=120)


def serve(info: dict, step) -> None:
  """A worker's main loop: prints `info` as JSON, then times `step(mode)` per stdin line.

  The request `info` prints `info` again (`step` may have updated it).
  """
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() == "info":
      print(json.dumps(info), flush=True)
      continue
    start = time.perf_counter()
    step(line.strip())
    print(time.perf_counter() - start, flush=True)


def fail_to_start(message: str) -> None:
  """A worker's start-up failure, reported to `Worker` as one line."""
  print(json.dumps({"error": message}), flush=True)
  sys.exit(1)
