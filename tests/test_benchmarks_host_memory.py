"""Allocator settings of the benchmark's processes: merging into GLIBC_TUNABLES/LD_PRELOAD."""

import ctypes.util
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import host_memory  # noqa: E402  pylint: disable=g-import-not-at-top


def test_environ_with_appends_to_existing_tunables_once():
  env = host_memory.environ_with(
      "resident", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "OTHER": "x"}
  )
  tunables = env["GLIBC_TUNABLES"].split(":")
  assert tunables[0] == "glibc.malloc.hugetlb=1"
  assert tunables[1:] == list(host_memory.SETTINGS["resident"].tunables)
  assert env["OTHER"] == "x"
  assert host_memory.environ_with("resident", env) == env  # idempotent
  assert host_memory.environ_with("shipped", {}) == {}
  # Every other setting keeps the programs from preloading their own allocator over it.
  assert host_memory.environ_with("default", {}) == {"STRIP_MLP_ALLOCATOR": "system"}


def test_unknown_setting_names_the_choices():
  with pytest.raises(ValueError, match="'hugepages'"):
    host_memory.environ_with("huge", {})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux")
def test_a_process_started_with_the_setting_gets_the_tunables():
  env = host_memory.environ_with("hugepages", {"PATH": "/usr/bin:/bin"})
  out = subprocess.run(
      [sys.executable, "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  assert out.strip() == "glibc.malloc.hugetlb=1"


def test_tcmalloc_is_preloaded_once_and_quietly():
  path = host_memory.preload_path("c")  # any installed library exercises the same path
  assert path.startswith("libc.so")
  with pytest.raises(ValueError, match="libno_such_allocator_x is not installed; install it"):
    host_memory.preload_path("no_such_allocator_x")
  try:
    env = host_memory.environ_with("tcmalloc", {"LD_PRELOAD": "libother.so"})
  except ValueError as e:  # the error must say what to install
    assert "apt-get install libtcmalloc-minimal4" in str(e)
    return
  first, rest = env["LD_PRELOAD"].split(":")
  assert first.startswith("libtcmalloc_minimal.so") and rest == "libother.so"
  assert host_memory.environ_with("tcmalloc", env) == env  # idempotent
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not ctypes.util.find_library("tcmalloc_minimal"),
    reason="needs Linux and libtcmalloc-minimal4 (.ci/run installs it)",
)
def test_a_process_started_with_tcmalloc_loads_it():
  code = "print(any('libtcmalloc' in line for line in open('/proc/self/maps')))"
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=host_memory.environ_with("tcmalloc"),
      capture_output=True,
      text=True,
      check=True,
  )
  assert out.stdout.strip() == "True"
