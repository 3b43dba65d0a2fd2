"""glibc malloc settings for XLA:CPU processes (Linux), chosen by name.

XLA:CPU allocates each execution's temporary buffer when the execution starts and frees
it when it ends: about 2.9 GiB for a tiny_light train step at batch 16. glibc serves a
block that large with a fresh mmap, so every step page-faults it back in (775k 4-KiB
faults, 1.3 s of system time per 2.8 s step on the README's 2-core VM). On a VM that hands
freed guest memory back to the host (virtio-balloon free page reporting, as there), a
fault on memory freed a few seconds earlier costs about 5x more, so a step that follows
another process's work ran at half speed.

  default:   glibc as configured.
  hugepages: `glibc.malloc.hugetlb=1`: transparent huge pages for mmapped blocks (about
             1.7k faults per step). Fastest for back-to-back steps; does not help after
             the memory went back to the host.
  resident:  one malloc arena that never mmaps or trims, so the temporary buffer stays
             mapped between steps: no faults at all, paid for with malloc contention
             between XLA's threads.

Tunables are read when a process starts, hence `reexec_with`. glibc < 2.35 ignores
`hugetlb`.
"""
import os
import sys

SETTINGS = {
    "default": (),
    "hugepages": ("glibc.malloc.hugetlb=1",),
    "resident": ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                 "glibc.malloc.trim_threshold=1099511627776", "glibc.malloc.tcache_count=4000"),
}


def environ_with(setting: str, environ=None) -> dict:
  """A copy of `environ` (default os.environ) whose GLIBC_TUNABLES include `setting`."""
  if setting not in SETTINGS:
    raise ValueError(f"malloc setting {setting!r} is not one of {sorted(SETTINGS)}")
  env = dict(os.environ if environ is None else environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  tunables += [t for t in SETTINGS[setting] if t not in tunables]
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def active(setting: str) -> bool:
  """Whether this process was started with `setting`'s tunables."""
  return environ_with(setting) == dict(os.environ)


def reexec_with(setting: str) -> None:
  """Restarts this Python process with `setting` (Linux; no-op if it is already active).

  Call it first thing in a script's `__main__`: the process is replaced.
  """
  if active(setting) or not sys.platform.startswith("linux"):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ_with(setting))
