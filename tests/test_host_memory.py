"""Allocator settings: merging into GLIBC_TUNABLES/LD_PRELOAD, errors, and the re-exec."""
import ctypes.util
import os
import subprocess
import sys

import pytest

from conftest import REPO
from strip_mlp import host_memory


def test_environ_with_appends_to_existing_tunables_once():
  env = host_memory.environ_with("resident", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                                              "OTHER": "x"})
  tunables = env["GLIBC_TUNABLES"].split(":")
  assert tunables[0] == "glibc.malloc.hugetlb=1"
  assert tunables[1:] == list(host_memory.SETTINGS["resident"].tunables)
  assert env["OTHER"] == "x"
  assert host_memory.environ_with("resident", env) == env  # idempotent
  assert host_memory.environ_with("default", {}) == {}


def test_unknown_setting_names_the_choices():
  with pytest.raises(ValueError, match="'hugepages'"):
    host_memory.environ_with("huge", {})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux")
def test_reexec_restarts_the_process_with_the_tunables():
  code = ("import os, sys; from strip_mlp import host_memory; "
          "print('start', flush=True); host_memory.reexec_with('hugepages'); "
          "print(os.environ['GLIBC_TUNABLES'], host_memory.active('hugepages'), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-c", code, "--flag"], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True).stdout.split("\n")
  assert out[:3] == ["start", "start", "glibc.malloc.hugetlb=1 True ['--flag']"]


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


@pytest.mark.skipif(not sys.platform.startswith("linux") or
                    not ctypes.util.find_library("tcmalloc_minimal"),
                    reason="needs Linux and libtcmalloc-minimal4 (.ci/run installs it)")
def test_reexec_with_tcmalloc_loads_it():
  code = ("from strip_mlp import host_memory; host_memory.reexec_with('tcmalloc'); "
          "print(any('libtcmalloc' in line for line in open('/proc/self/maps')))")
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "True" and "large alloc" not in out.stderr


def test_environ_without_undoes_environ_with():
  base = {"GLIBC_TUNABLES": "glibc.other=1", "PATH": "/bin"}
  for setting in ("default", "hugepages", "resident"):
    assert host_memory.environ_without(setting, host_memory.environ_with(setting, base)) == base
  assert host_memory.environ_without("resident", {"PATH": "/bin"}) == {"PATH": "/bin"}
  with pytest.raises(ValueError, match="'hugepages'"):
    host_memory.environ_without("huge", {})
