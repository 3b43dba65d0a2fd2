"""Ahead-of-time compilation of the train step for TPU topologies (strip_mlp/train/compile_for.py,
train.py --compile_for): the real TPU compiler (libtpu, the `tpu` extra) over abstract
devices, on this CPU machine."""

import os
import subprocess
import sys

import pytest

import train_test_utils
from strip_mlp.runtime import tpu_topology
from strip_mlp.train import compile_for

REPO = train_test_utils.REPO
NO_BLOCKS = {"model.layers": (0, 0, 0, 0)}  # stem, merges, head: a compile of seconds


def _config(**overrides):
  return train_test_utils.small_config(**overrides)


def _train_py(*args, env_extra=None, prelude=""):
  """Runs train.py (with `prelude` Python run first) -> CompletedProcess."""
  code = (
      f"{prelude}\nimport runpy, sys\nsys.argv = ['train.py'] + {list(args)!r}\n"
      "runpy.run_path('train.py', run_name='__main__')"
  )
  env = dict(os.environ, **train_test_utils.CACHE_ENV, **(env_extra or {}))
  if prelude:  # it lives in this process only: train.py's restart with mimalloc would drop it
    env["STRIP_MLP_ALLOCATOR"] = "system"
  return subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )


def test_the_train_step_compiles_for_a_single_host_slice():
  """The demo step as train.py runs it (1 block per stage, BatchNorm groups, mixup/cutmix,
  two micro-batches, FSDP over pairs of chips) compiles for v5e:2x2, and the report holds
  the compiler's figures."""
  devices = tpu_topology.devices("v5e:2x2")
  config = _config(grad_accum_steps=2, group_size=8, **{"mesh.fsdp": 2, "data.mixup_alpha": 0.8})
  r = compile_for.compile_step(config, devices, topology="v5e:2x2", batch_per_chip=16)
  assert (r.chips, r.processes, r.batch_per_chip) == (4, 1, 16)
  assert r.chip.generation == "v5e" and r.chip.hbm_bytes == 16 * 2**30
  assert r.hbm_bytes == int(15.75 * 2**30)  # the compiler's own limit, reservations deducted
  assert r.argument_bytes > 0 and r.temp_bytes > 0 and r.code_bytes > 0
  assert 0 < r.total_bytes < r.chip.hbm_bytes and r.fits()
  assert r.flops > 0 and r.bytes_accessed > 0 and r.roofline_s > 0
  assert r.census["convolution"] > 0 and r.census["total"] > r.census["fusion"] > 0
  assert r.census.get("all-reduce", 0) > 0  # gradients summed over the chips
  lines = compile_for.describe(r)
  assert lines[-1].startswith("verdict: fits")


def test_a_multi_host_pod_compiles_as_one_global_mesh():
  devices = tpu_topology.devices("v5e:4x4")
  assert len({d.process_index for d in devices}) == 4
  r = compile_for.compile_step(_config(**NO_BLOCKS), devices, topology="v5e:4x4", batch_per_chip=8)
  assert (r.chips, r.processes, r.batch_per_chip) == (16, 4, 8)


def test_memory_grows_with_the_batch_and_the_verdict_flips_at_the_hbm_limit():
  devices = tpu_topology.devices("v5e:2x2")
  config = _config(**NO_BLOCKS)
  small = compile_for.compile_step(config, devices, batch_per_chip=8)
  large = compile_for.compile_step(config, devices, batch_per_chip=64)
  assert large.temp_bytes > small.temp_bytes
  assert large.total_bytes > small.total_bytes
  between = (small.total_bytes + large.total_bytes) // 2
  assert small.fits(between) and not large.fits(between)
  assert compile_for.describe(large, between)[-1].startswith("verdict: does not fit")


def test_a_step_the_compiler_refuses_for_memory_does_not_fit():
  devices = tpu_topology.devices("v5e:2x2")
  config = _config(**NO_BLOCKS, **{"data.image_size": 224})
  r = compile_for.compile_step(config, devices, batch_per_chip=16384)
  assert r.refused.startswith("RESOURCE_EXHAUSTED") and not r.fits()
  assert r.temp_bytes > r.hbm_bytes  # what the compiler said the temporaries need
  assert compile_for.describe(r)[-1].startswith("verdict: does not fit")


def test_max_batch_finds_the_boundary_of_a_made_up_hbm():
  devices = tpu_topology.devices("v5e:2x2")
  config = _config(**NO_BLOCKS)
  at = {b: compile_for.compile_step(config, devices, batch_per_chip=b) for b in (8, 16)}
  hbm = at[16].total_bytes + (at[16].total_bytes - at[8].total_bytes) * 2.5  # ~ batch 36
  best, tried = compile_for.max_batch(config, devices, hbm_bytes=int(hbm), log=lambda _: None)
  assert best is not None and best.fits(int(hbm))
  step = compile_for.batch_step(config, 4)
  assert best.batch_per_chip >= 16
  assert best.batch_per_chip + step in tried and not tried[best.batch_per_chip + step].fits(
      int(hbm)
  )


def test_the_command_line_prints_the_report_and_exits_3_when_it_does_not_fit():
  args = ["--compile_for=v5e:2x2", "--config.model.layers=(0,0,0,0)"]
  ok = _train_py(*args)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "verdict: fits" in ok.stdout and "per chip" in ok.stdout
  assert ok.stderr.strip() == "", ok.stderr[-2000:]  # libtpu's start-up notices dropped
  tight = _train_py(*args, "--hbm_gib=0.001")
  assert tight.returncode == 3, tight.stderr[-2000:]
  assert "verdict: does not fit" in tight.stdout


def test_max_batch_mode_says_when_nothing_fits():
  """--max_batch with an HBM too small for any batch: both remat settings are searched,
  the recommendation says so, exit code 3."""
  p = _train_py(
      "--compile_for=v5e:2x2",
      "--config.model.layers=(0,0,0,0)",
      "--max_batch",
      "--hbm_gib=0.001",
  )
  assert p.returncode == 3, p.stderr[-2000:]
  assert "remat off: even 8 per chip does not fit" in p.stdout
  assert "remat on: even 8 per chip does not fit" in p.stdout
  assert "recommended: the configured 16 per chip does not fit" in p.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--compile_for=v9z:2x2"], "is not a TPU topology"),
        (["--compile_for=v5e:3x7"], "does not know topology 'v5e:3x7'"),
        (["--compile_for=v5e:2x2", "--config.batch_size=6"], "does not divide over the 4 chips"),
        (["--max_batch"], "go with --compile_for"),
    ],
)
def test_one_line_errors(args, expected):
  p = _train_py(*args)
  assert p.returncode == 1, p.stderr[-2000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("train.py: error: "), p.stderr[-2000:]
  assert expected in lines[0]


def test_without_libtpu_one_line_says_what_to_install():
  p = _train_py("--compile_for=v5e:2x2", prelude="import sys; sys.modules['libtpu'] = None")
  assert p.returncode == 1
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install 'strip-mlp-jax[tpu]'" in lines[0], p.stderr[-2000:]


def test_auto_formulations_resolve_for_the_target_not_this_machine():
  c = compile_for.for_platform(_config(), "tpu")
  assert (c.model.depthwise_impl, c.model.patchify_impl) == ("xla", "einsum")
  c = compile_for.for_platform(_config(), "cpu")
  assert c.model.depthwise_impl == "shift"


def test_op_census_counts_opcodes_of_hlo_text():
  text = """
  %fusion.1 = f32[8,128]{1,0:T(8,128)} fusion(f32[8,128]{1,0} %p), kind=kLoop, calls=%f
  ROOT %t = (f32[8]{0}, s32[]) tuple(f32[8]{0} %a, s32[] %b)
  copy-start.2 = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(f32[4]{0} %x)
  copy-done.2 = f32[4]{0} copy-done((f32[4]{0}, f32[4]{0}, u32[]) %copy-start.2)
  slice.3 = f32[2]{0} slice(f32[4]{0} %x), slice={[0:2]}
  """
  census = compile_for.op_census(text)
  assert census == {"fusion": 1, "tuple": 1, "copy": 1, "slice": 1, "total": 4}


def test_no_search_for_a_tpu_where_there_is_none():
  """libtpu is installed here (for the compiles) and there is no TPU: the programs keep JAX
  on the CPU instead of letting libtpu print its failed search for TPU hosts."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = (
      "from strip_mlp.runtime import cli; chose = cli.skip_absent_tpu(); import jax; "
      "print(chose, jax.devices()[0].platform)"
  )
  p = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split() == ["True", "cpu"]
  assert "TPU" not in p.stderr, p.stderr[-2000:]
