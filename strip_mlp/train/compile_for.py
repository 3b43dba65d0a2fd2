"""Ahead-of-time compilation of the training step for a TPU topology, on any machine.

`compile_step(config, devices)` builds the run exactly as train.py does (`build`: config,
plan, ('data', 'fsdp') mesh, shardings, remat, dtype, grad accumulation, the jitted update)
over abstract devices (strip_mlp/runtime/tpu_topology.py), lowers the train step with
abstract inputs (no data read, no device touched) and compiles it with the TPU compiler.
Its `Report` holds what the compiler says per chip: argument/output/temporary/code bytes,
FLOPs and bytes accessed, and the HLO op census. `max_batch` searches the largest per-chip
batch that fits. Memory and FLOPs are the compiler's; a time from them is an estimate.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import jax

from strip_mlp.data.config import DatasetInfo
from strip_mlp.errors import ConfigError
from strip_mlp.evaluation import evaluate
from strip_mlp.models import ops
from strip_mlp.runtime import sharding, tpu_topology
from strip_mlp.train import plan as plan_lib

# (num_classes, num_train, num_eval) of the datasets the configs name: the plan needs the
# sizes (the schedule's length), the model the class count; no data is read.
KNOWN_DATASETS = {
    "imagenet2012": (1000, 1281167, 50000),
    "cifar10": (10, 50000, 10000),
    "cifar100": (100, 50000, 10000),
    "caltech101": (102, 3060, 6084),
    "digits": (10, 1438, 359),
}
CENSUS_OPS = ("convolution", "dot", "fusion", "slice", "gather", "transpose", "copy")
_TEMPORARIES = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")
_OPCODE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")


@dataclasses.dataclass(frozen=True)
class Report:
  """One compiled train step. Bytes and FLOPs are per chip (device) and per step."""

  topology: str
  chips: int
  processes: int
  batch_per_chip: int
  chip: tpu_topology.Chip
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  compile_s: float
  census: dict
  hbm_bytes: int  # what the compiler lets a program use on one chip
  refused: str = ""  # the compiler's message when the program did not fit (figures are 0
  # but temp_bytes, what it said the temporaries need)

  @property
  def total_bytes(self) -> int:
    """What the step holds at its peak: arguments, outputs not aliased to them (the
    donated state is updated in place), temporaries and the program."""
    held = self.argument_bytes + self.output_bytes - self.alias_bytes
    return held + self.temp_bytes + self.code_bytes

  def fits(self, hbm_bytes: int | None = None) -> bool:
    return not self.refused and self.total_bytes <= (hbm_bytes or self.hbm_bytes)

  @property
  def roofline_s(self) -> float:
    """max(FLOPs / peak, bytes accessed / HBM bandwidth): an estimate, not a measurement."""
    return max(self.flops / self.chip.peak_flops, self.bytes_accessed / self.chip.hbm_bytes_per_s)


def dataset_info(config):
  """The plan's DatasetInfo from KNOWN_DATASETS and model.num_classes (no data read)."""
  name = config.data.name if config.data.source != "folder" else config.data.folder_root
  known = KNOWN_DATASETS.get(name)
  classes = config.model.num_classes or config.data.get("num_classes") or (known or (0,))[0]
  if not classes:
    raise ConfigError(
        f"compiling without data needs the class count of {name!r}: set "
        "--config.model.num_classes=N"
    )
  num_train, num_eval = known[1:] if known else (max(config.batch_size, 1) * 1000, 1)
  return DatasetInfo(
      name=name,
      num_classes=int(classes),
      num_train=int(num_train),
      num_eval=int(num_eval),
      image_size=int(config.data.image_size),
      train_split=config.data.train_split,
      eval_split=config.data.get("eval_split") or "",
  )


def for_platform(config, platform: str = "tpu"):
  """A copy of `config` with the 'auto' formulations resolved for `platform`, not for the
  machine that compiles (a CPU here would pick its own)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for kind in ("depthwise", "patchify"):
      key = f"{kind}_impl"
      config.model[key] = ops.resolve_impl(kind, config.model.get(key, "auto"), platform)
  return config


def compile_step(config, devices, *, topology: str = "", batch_per_chip: int | None = None):
  """Compiles `config`'s train step over `devices`; returns a Report.

  batch_per_chip: replaces config.batch_size by this many images per chip (times the chip
  count; the eval batch follows it). Raises ConfigError (one line) for a batch, accumulation, group or mesh that the
  device count cannot take, as train.py would on those devices.
  """
  from strip_mlp.train.build import build  # pylint: disable=g-import-not-at-top

  n = len(devices)
  processes = len({d.process_index for d in devices})
  config = for_platform(config, devices[0].platform)
  if batch_per_chip is not None:
    with config.unlocked():
      config.batch_size = int(batch_per_chip) * n
      config.eval_batch_size = None  # (not compiled here) the batch's, which divides
  plan_lib.validate_config(config, num_devices=n, num_processes=processes)
  mesh = sharding.create_mesh(config.mesh.fsdp, devices=devices)
  info = dataset_info(config)
  if batch_per_chip is not None:  # a searched batch may exceed a small training split
    info = dataclasses.replace(info, num_train=max(info.num_train, config.batch_size))
  run = build(config, info, mesh)
  t0 = time.time()
  lowered = run.train_step.lower(
      run.abstract_state,
      evaluate.abstract_eval_batch(
          config.batch_size, config.data, sharding.batch_sharding(mesh), mask=False
      ),
  )
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # no client to load TPU programs
  common = dict(
      topology=topology,
      chips=n,
      processes=processes,
      batch_per_chip=config.batch_size // n,
      chip=tpu_topology.chip_of(devices),
      hbm_bytes=tpu_topology.usable_hbm_bytes(devices),
  )
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = _TEMPORARIES.search(str(e))
    return Report(
        **common,
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=tpu_topology.parse_bytes(*needed.groups()) if needed else 0,
        code_bytes=0,
        flops=0.0,
        bytes_accessed=0.0,
        compile_s=time.time() - t0,
        census={},
        refused=str(e).strip().splitlines()[0][:300],
    )
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return Report(
      **common,
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes),
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      compile_s=compile_s,
      census=op_census(compiled.as_text()),
  )


def op_census(hlo_text: str) -> dict:
  """Instruction counts of an HLO module's text, by opcode (fused bodies included), with
  'total'. Async pairs count once (`copy-start`/`copy-done` as 'copy')."""
  counts = collections.Counter()
  for line in hlo_text.splitlines():
    m = _OPCODE.match(line)
    if m:
      op = m.group(1)
      if op.endswith("-done"):
        continue
      counts[op.removesuffix("-start")] += 1
  counts["total"] = sum(counts.values())
  return dict(counts)


def batch_step(config, chips: int) -> int:
  """The per-chip batch granule: a multiple of 8 whose global batch every micro-batch
  and BatchNorm/mixup group divides."""
  unit = int(config.grad_accum_steps) * int(config.get("group_size") or 1)
  step = 8
  while (step * chips) % unit:
    step += 8
  return step


def max_batch(config, devices, *, topology="", hbm_bytes=None, start=None, seen=None, log=print):
  """The largest per-chip batch (a multiple of `batch_step`) whose step fits in
  `hbm_bytes` (default: the chip's HBM). Returns (its Report or None when not even one
  granule fits, {batch: Report} of every compile).

  Each probe is a compile: first `start` (default: the configured batch per chip), or
  after `seen` ({batch: Report} already compiled) the next, strictly inside the bracket of
  the largest batch that fits and the smallest that does not (`_next_probe`), until both
  ends are compiled one granule apart.
  """
  g = batch_step(config, len(devices))
  hbm = hbm_bytes or tpu_topology.usable_hbm_bytes(devices)
  compiled = dict(seen or {})
  good = max([b for b, r in compiled.items() if r.fits(hbm)], default=0)
  bad = min([b for b, r in compiled.items() if not r.fits(hbm)], default=None)
  run, last, b = 0, None, max(g, (start or config.batch_size // len(devices)) // g * g)
  b = _next_probe(compiled, hbm, g, good, bad, run) if compiled else b
  while bad is None or bad - good > g:
    r = compiled[b] = compile_step(config, devices, topology=topology, batch_per_chip=b)
    ok = r.fits(hbm)
    verdict = "fits" if ok else "refused" if r.refused else "does not fit"
    log(f"  batch/chip {b:5d}: {size(r.total_bytes)} {verdict} ({r.compile_s:.0f}s compile)")
    run, last = (run + 1 if ok == last else 1), ok  # probes in a row that moved one end
    good, bad = (b, bad) if ok else (good, b)
    b = _next_probe(compiled, hbm, g, good, bad, run)
  return compiled.get(good), compiled


def _next_probe(compiled, hbm: int, g: int, good: int, bad, run: int) -> int:
  """The next batch to compile, a multiple of g strictly between `good` and `bad`: where
  the memory line crosses `hbm` (through the compiled step nearest it and the one farthest
  from that; from one, its memory but the donated state taken as per-image; with none
  below the HBM, from a refused step's temporaries), or the bracket's middle once the line
  moved the same end `run` times in a row (3; 2 with nothing below the HBM compiled)."""
  top = bad - g if bad is not None else None
  known = sorted((abs(r.total_bytes - hbm), b, r) for b, r in compiled.items() if not r.refused)
  if bad is not None and run >= (3 if known else 2):
    return max(good + g, min(top, (good + bad) // 2 // g * g))
  if len(known) >= 2:  # memory steps with the TPU's tiling: the widest baseline for the slope
    _, b1, r1 = known[0]
    _, b2, r2 = max(known[1:], key=lambda k: abs(k[1] - b1))
    slope = (r2.total_bytes - r1.total_bytes) / (b2 - b1)
    guess = b1 + (hbm - r1.total_bytes) / slope if slope > 0 else 2 * good
  elif known:
    _, b1, r1 = known[0]
    guess = b1 * hbm / max(r1.total_bytes - r1.alias_bytes, 1)
  else:
    r = compiled[bad]
    guess = bad * hbm / r.temp_bytes if r.temp_bytes else bad / 2
  guess = int(guess) // g * g
  if bad is None and run >= 2:  # fitted twice in a row: grow by at least an eighth
    guess = max(guess, good + good // 8 // g * g)
  return max(good + g, min(guess, top) if top is not None else guess)


def size(n: float) -> str:
  """Bytes for a terminal: '6.43 GiB', '12.0 MiB'."""
  return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(r: Report, hbm_bytes: int | None = None) -> list[str]:
  """The report as lines for a terminal, ending with the verdict."""
  hbm = hbm_bytes or r.hbm_bytes
  images = r.batch_per_chip
  if r.refused:
    return [
        f"the TPU compiler refused the train step for {r.topology or r.chip.generation} at "
        f"batch {images} per chip: {r.refused}",
        f"verdict: does not fit: its temporaries alone need {size(r.temp_bytes)} of the "
        f"{size(r.hbm_bytes)} a program can use; lower batch_size, raise grad_accum_steps or "
        "mesh.fsdp, or set model.remat=True / model.dtype=bfloat16",
    ]
  lines = [
      f"compiled the train step for {r.topology or r.chip.generation} ({r.chips} chips, "
      f"{r.processes} host(s)) in {r.compile_s:.1f}s: batch {images} per chip, "
      f"{images * r.chips} global",
      f"  per chip: arguments {size(r.argument_bytes)}, outputs {size(r.output_bytes)} "
      f"({size(r.alias_bytes)} of them in place of the donated state), temporaries "
      f"{size(r.temp_bytes)}, code {size(r.code_bytes)}",
      f"  total {size(r.total_bytes)} of {size(hbm)} "
      + (
          "(--hbm_gib)"
          if hbm_bytes
          else f"HBM usable on a {r.chip.generation} chip (the "
          f"compiler's figure; {size(r.chip.hbm_bytes)} published, {r.chip.source})"
      ),
      f"  FLOPs per chip per step {r.flops / 1e9:,.1f} G, per image "
      f"{r.flops / max(images, 1) / 1e9:.2f} G; bytes accessed {size(r.bytes_accessed)}",
      f"  roofline estimate (not a measurement): {1e3 * r.roofline_s:.2f} ms per step, "
      f"{images / max(r.roofline_s, 1e-12):,.0f} images/s per chip at the chip's peak",
      "  HLO instructions: "
      + ", ".join(f"{op} {r.census.get(op, 0)}" for op in ("total",) + CENSUS_OPS),
  ]
  left = hbm - r.total_bytes
  if left >= 0:
    lines.append(f"verdict: fits, {size(left)} ({100 * left / hbm:.0f}%) to spare")
  else:
    lines.append(
        f"verdict: does not fit, {size(-left)} over; lower batch_size, raise "
        "grad_accum_steps or mesh.fsdp, or set model.remat=True / model.dtype=bfloat16"
    )
  return lines


def main(
    config, topology: str, *, find_max_batch: bool = False, hbm_gib: float | None = None, log=print
) -> bool:
  """train.py --compile_for: compiles `config`'s step for `topology` and prints the report
  (with `find_max_batch`, the largest per-chip batch with and without remat and the one
  recommended). Returns whether the configured step fits. Raises UserError (one line)."""
  jax.config.update("jax_platforms", "cpu")  # nothing runs here; libtpu is only the compiler
  devices = tpu_topology.devices(topology)
  hbm = int(hbm_gib * 2**30) if hbm_gib else None
  if hbm is not None and hbm <= 0:
    raise ConfigError(f"--hbm_gib={hbm_gib} must be positive")
  if config.batch_size % len(devices):
    raise ConfigError(
        f"batch_size={config.batch_size} does not divide over the {len(devices)} chips of "
        f"{topology}; give a multiple of {len(devices)}"
    )
  if not find_max_batch:
    report = compile_step(config, devices, topology=topology)
    for line in describe(report, hbm):
      log(line)
    return report.fits(hbm)
  return _search(config, devices, topology, hbm, log)


def _search(config, devices, topology: str, hbm: int | None, log) -> bool:
  """The max-batch mode of `main`: remat off and (Strip-MLP only) on."""
  wanted = config.batch_size // len(devices)
  results = {}
  options = (False, True) if not config.model.get("name") else (False,)
  for remat in options:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.remat = remat
    log(f"remat {'on' if remat else 'off'}: searching the batch per chip on {topology}")
    best, _ = max_batch(c, devices, topology=topology, hbm_bytes=hbm, log=log)
    results[remat] = best
    if best is None:
      log(
          f"remat {'on' if remat else 'off'}: even {batch_step(c, len(devices))} per chip does "
          "not fit"
      )
    else:
      log(
          f"remat {'on' if remat else 'off'}: at most {best.batch_per_chip} per chip "
          f"({size(best.total_bytes)}; {best.flops / best.batch_per_chip / 1e9:.1f} "
          "GFLOP per image)"
      )
  if len(options) == 1:
    log("remat applies to Strip-MLP only (model.name='')")
  off, on = results.get(False), results.get(True)
  if off is not None and off.batch_per_chip >= wanted:
    log(
        f"recommended: remat off, batch up to {off.batch_per_chip} per chip (the configured "
        f"{wanted} fits without recomputing the forward pass)"
    )
  elif on is not None and on.batch_per_chip >= wanted:
    log(
        f"recommended: model.remat=True: the configured {wanted} per chip fits only with "
        "remat (about one more forward pass of compute)"
    )
  else:
    top = max((r for r in (off, on) if r is not None), key=lambda r: r.batch_per_chip, default=None)
    log(
        f"recommended: the configured {wanted} per chip does not fit; "
        + (
            f"use at most {top.batch_per_chip} per chip (grad_accum_steps or more chips for the "
            "global batch)"
            if top
            else "use more chips with mesh.fsdp, or a smaller model"
        )
    )
  return any(r is not None and r.batch_per_chip >= wanted for r in (off, on))
