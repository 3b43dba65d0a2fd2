"""The programs' host allocator: mimalloc, installed with the package, preloaded at start.

XLA:CPU allocates each execution's temporary buffer when the execution starts and frees it
when it ends (about 3.2 GiB for tiny_light's train step at batch 16). glibc's malloc serves a
block that large with a fresh mmap, so every step page-faults the whole buffer back in
(benchmarks/README.md). mimalloc, set up as below, keeps it mapped for reuse. A malloc can
only be replaced before the process starts, so `use_packaged_allocator` re-executes the
running program once, with the same interpreter, options and arguments, and with mimalloc
(`cmeel-mimalloc`, a dependency of the package on Linux x86_64/aarch64) in LD_PRELOAD.

train.py, eval.py and the benchmarks' workers call it first thing. Nothing else does: a
library must not restart its user's process, so `import strip_mlp` in your own script keeps
your allocator; `env $(python -m strip_mlp.runtime.host_allocator) python your_script.py`
starts it as the programs start.

STRIP_MLP_ALLOCATOR=system keeps the allocator the process started with, as does an
allocator already in LD_PRELOAD (tcmalloc, jemalloc). MIMALLOC_* variables already set are
kept.
"""

import importlib.metadata
import os
import sys

from strip_mlp.runtime import supervisor

ENV = "STRIP_MLP_ALLOCATOR"
CHOICES = ("mimalloc", "system")
# Freed memory stays mapped (no purge), blocks of any size come from mimalloc's arenas
# (by default it maps a block over ~2 GiB afresh and unmaps it when freed, so a train step's
# temporary buffer was faulted back in every step), and in transparent huge pages where the
# kernel gives them on request (THP 'madvise'): mimalloc's defaults purge after 10 ms and
# turn THP off for the whole process, which left the train step as slow as with glibc.
MIMALLOC_OPTIONS = {
    "MIMALLOC_PURGE_DELAY": "-1",
    "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "1TiB",
    "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1",
}
_DISTRIBUTION = "cmeel-mimalloc"
_LIBRARY = "libmimalloc.so"


def packaged_library() -> str | None:
  """The path of mimalloc's shared library installed with the package, or None."""
  try:
    files = importlib.metadata.files(_DISTRIBUTION) or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name == _LIBRARY:
      path = str(f.locate())
      return path if os.path.exists(path) else None
  return None


def choice(environ=None) -> str:
  """STRIP_MLP_ALLOCATOR's value (default 'mimalloc'); ValueError names the choices."""
  value = (os.environ if environ is None else environ).get(ENV, "") or "mimalloc"
  if value not in CHOICES:
    raise ValueError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}")
  return value


def preloaded(environ=None) -> bool:
  """Whether a process with `environ` (default: this one's) starts with an allocator
  preloaded (mimalloc, tcmalloc, jemalloc, ...: a library named *malloc*)."""
  preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
  return any("malloc" in os.path.basename(p) for p in preload.replace(" ", ":").split(":"))


def reexec_environ(environ=None) -> dict | None:
  """The environment to re-execute with, or None when this process should go on as is
  (not Linux, STRIP_MLP_ALLOCATOR=system, an allocator already preloaded, mimalloc not
  installed)."""
  env = dict(os.environ if environ is None else environ)
  if not sys.platform.startswith("linux") or choice(env) == "system" or preloaded(env):
    return None
  library = packaged_library()
  if library is None:
    return None
  env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
  env[ENV] = "mimalloc"
  for name, value in MIMALLOC_OPTIONS.items():
    env.setdefault(name, value)
  return env


def use_packaged_allocator(prog: str) -> None:
  """Re-executes program `prog` with mimalloc preloaded, unless `reexec_environ` says not.

  Call it before anything else runs: whatever the process did so far is started again.
  A bad STRIP_MLP_ALLOCATOR exits with one line `prog: error: ...` (exit code 1).
  """
  try:
    env = reexec_environ()
  except ValueError as e:
    sys.exit(f"{prog}: error: {e}")
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, supervisor.own_command(), env)


def _print_variables() -> int:
  """Prints the variables the programs add (NAME=value ...), for `env $(...) command`."""
  env = reexec_environ({k: v for k, v in os.environ.items() if k != ENV})
  if env is None:
    print("no packaged allocator to preload here (Linux with cmeel-mimalloc)", file=sys.stderr)
    return 1
  print(" ".join(f"{k}={v}" for k, v in env.items() if os.environ.get(k) != v and k != ENV))
  return 0


if __name__ == "__main__":
  sys.exit(_print_variables())
