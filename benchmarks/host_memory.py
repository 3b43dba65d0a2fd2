"""Host allocator settings for XLA:CPU processes (Linux), chosen by name.

XLA:CPU allocates each execution's temporary buffer when the execution starts and frees
it when it ends: about 2.9 GiB for a tiny_light train step at batch 16. glibc serves a
block that large with a fresh mmap, so every step page-faults it back in (775k 4-KiB
faults, 1.3 s of system time per 2.8 s step on the 2-core VM of benchmarks/README.md).
On a VM that hands freed guest memory back to the host (virtio-balloon free page
reporting, as there), a fault on memory freed a few seconds earlier costs about 5x more,
so a step that follows another process's work ran at half speed.

  shipped:   what train.py, eval.py and benchmarks/jax_worker.py start with: mimalloc,
             preloaded by the process itself (strip_mlp/runtime/host_allocator.py).
  default:   glibc as configured (what `import strip_mlp` in a script of your own gets).
  hugepages: `glibc.malloc.hugetlb=1`: transparent huge pages for mmapped blocks (about
             1.7k faults per step). Does not help after the memory went back to the host.
  resident:  one glibc arena that never mmaps or trims, so the temporary buffer stays
             mapped between steps: no faults, paid for with malloc contention between
             XLA's threads.
  tcmalloc:  gperftools' tcmalloc preloaded (`libtcmalloc_minimal.so.4`; Debian/Ubuntu
             package libtcmalloc-minimal4): keeps freed spans mapped and small blocks in
             per-thread caches: no faults and no contention. Fastest here.

Both the tunables and LD_PRELOAD are read when a process starts: the benchmark starts each
model's process with `environ_with(setting)`. glibc < 2.35 ignores `hugetlb`.
"""

import ctypes.util
import os
from typing import NamedTuple


class Setting(NamedTuple):
  tunables: tuple = ()  # GLIBC_TUNABLES entries
  preload: str = ""  # allocator library to preload (name without 'lib')
  environ: tuple = ()  # further (variable, value) pairs


_RESIDENT = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=1099511627776",
    "glibc.malloc.tcache_count=4000",
)
SETTINGS = {
    "default": Setting(),
    "hugepages": Setting(tunables=("glibc.malloc.hugetlb=1",)),
    "resident": Setting(tunables=_RESIDENT),
    # tcmalloc reports every allocation over 1 GiB on stderr unless told otherwise.
    "tcmalloc": Setting(
        preload="tcmalloc_minimal",
        environ=(("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)),),
    ),
}
# The programs (and benchmarks/jax_worker.py) preload mimalloc themselves unless told not to:
# every setting but 'shipped' keeps the allocator it sets up.
SETTINGS = {
    "shipped": Setting(),
    **{
        name: s._replace(environ=s.environ + (("STRIP_MLP_ALLOCATOR", "system"),))
        for name, s in SETTINGS.items()
    },
}


def preload_path(library: str) -> str:
  """The loadable file name of lib`library` (e.g. 'libtcmalloc_minimal.so.4')."""
  found = ctypes.util.find_library(library)
  if not found:
    raise ValueError(
        f"lib{library} is not installed; install it (Debian/Ubuntu: apt-get "
        f"install libtcmalloc-minimal4) or pick another malloc setting"
    )
  return found


def _setting(name: str) -> Setting:
  if name not in SETTINGS:
    raise ValueError(f"malloc setting {name!r} is not one of {sorted(SETTINGS)}")
  return SETTINGS[name]


def _entries(env: dict, var: str) -> list:
  """The entries of a colon-separated variable (GLIBC_TUNABLES, LD_PRELOAD)."""
  return [e for e in env.get(var, "").split(":") if e]


def _set_entries(env: dict, var: str, entries: list) -> None:
  if entries:
    env[var] = ":".join(entries)
  else:
    env.pop(var, None)


def environ_with(setting: str, environ=None) -> dict:
  """A copy of `environ` (default os.environ) with `setting`'s variables added."""
  chosen = _setting(setting)
  env = dict(os.environ if environ is None else environ)
  tunables = _entries(env, "GLIBC_TUNABLES")
  _set_entries(env, "GLIBC_TUNABLES", tunables + [t for t in chosen.tunables if t not in tunables])
  if chosen.preload:
    preload, path = _entries(env, "LD_PRELOAD"), preload_path(chosen.preload)
    _set_entries(env, "LD_PRELOAD", preload if path in preload else [path] + preload)
  return {**env, **dict(chosen.environ)}
