"""The programs' allocator: mimalloc installed with the package, preloaded by a re-exec."""

import os
import subprocess
import sys
import textwrap

import pytest

from strip_mlp.runtime import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = sys.platform.startswith("linux")

# Prints whether mimalloc is mapped into the process, then its arguments and -u's effect.
_PROBE = textwrap.dedent("""
    import sys
    from strip_mlp.runtime import host_allocator
    host_allocator.use_packaged_allocator("probe")
    with open("/proc/self/maps") as f:
      mapped = "libmimalloc" in f.read()
    print(mapped, sys.argv[1:], sys.flags.dont_write_bytecode)
""")


def _run(env_extra, *args, script=None, tmp_path=None):
  """Runs `script` (default: _PROBE written to tmp_path) with interpreter option -B."""
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.ENV)}
  env.update(env_extra, PYTHONPATH=ROOT)
  if script is None:
    script = str(tmp_path / "probe.py")
    with open(script, "w") as f:
      f.write(_PROBE)
  cmd = [sys.executable, "-B", script, *args]
  return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not LINUX, reason="mimalloc is a dependency on Linux only")
def test_the_library_is_installed_with_the_package():
  path = host_allocator.packaged_library()
  assert path and os.path.isfile(path) and os.path.basename(path) == "libmimalloc.so"


@pytest.mark.skipif(not LINUX, reason="mimalloc is a dependency on Linux only")
def test_reexec_environ():
  library = host_allocator.packaged_library()
  env = host_allocator.reexec_environ({"LD_PRELOAD": "/x/libother.so"})
  assert env["LD_PRELOAD"] == f"{library}:/x/libother.so"
  assert host_allocator.preloaded(env)
  assert host_allocator.reexec_environ(env) is None  # once only
  assert host_allocator.reexec_environ({host_allocator.ENV: "system"}) is None
  assert host_allocator.reexec_environ({"LD_PRELOAD": "/y/libmimalloc.so.3"}) is None
  assert host_allocator.reexec_environ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}) is None
  with pytest.raises(ValueError, match="STRIP_MLP_ALLOCATOR='jemalloc' is not one of mimalloc"):
    host_allocator.reexec_environ({host_allocator.ENV: "jemalloc"})


@pytest.mark.skipif(not LINUX, reason="mimalloc is a dependency on Linux only")
def test_the_process_restarts_with_mimalloc_and_keeps_its_arguments_and_options(tmp_path):
  out = _run({}, "a b", "--c", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "True ['a b', '--c'] 1"
  assert _run({host_allocator.ENV: "system"}, tmp_path=tmp_path).stdout.split()[0] == "False"


def test_a_bad_value_is_one_line_from_the_programs():
  for program in ("train.py", "eval.py"):
    out = _run({host_allocator.ENV: "tcmalloc"}, "--help", script=program)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"{program}: error: STRIP_MLP_ALLOCATOR='tcmalloc' is not one of mimalloc, system"
    )


@pytest.mark.skipif(not LINUX, reason="mimalloc is a dependency on Linux only")
def test_the_variables_for_a_script_of_your_own(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.ENV)}
  out = subprocess.run(
      [sys.executable, "-m", "strip_mlp.runtime.host_allocator"],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
  ).stdout.split()
  variables = dict(v.split("=", 1) for v in out)
  assert variables == {
      "LD_PRELOAD": host_allocator.packaged_library(),
      **host_allocator.MIMALLOC_OPTIONS,
  }
  # Started with them, a script is not restarted and has mimalloc.
  assert _run(variables, tmp_path=tmp_path).stdout.split()[0] == "True"


# Touches a freed-and-reallocated block of 2.5 GiB (larger than mimalloc's default largest
# arena object, about 2 GiB) three times; prints the page faults of each touch.
_REFAULT = textwrap.dedent("""
    import ctypes, resource
    from strip_mlp.runtime import host_allocator
    host_allocator.use_packaged_allocator("refault")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(3):
      block = libc.malloc(5 << 29)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ctypes.memset(block, 1, 5 << 29)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(block)
    print(*faults)
""")


@pytest.mark.skipif(not LINUX, reason="mimalloc is a dependency on Linux only")
def test_a_freed_block_over_2_gib_is_reused_without_page_faults(tmp_path):
  """XLA:CPU frees each step's temporary buffer (3.2 GiB for tiny_light's train step at
  batch 16) and allocates it again next step: it must not be mapped afresh each time."""
  script = tmp_path / "refault.py"
  script.write_text(_REFAULT)
  out = _run({}, script=str(script))
  assert out.returncode == 0, out.stderr
  first, *again = map(int, out.stdout.split())
  assert first >= 1000  # 2.5 GiB is 1280 pages of 2 MiB: the first touch maps it
  assert max(again) <= first // 100, (first, again)
