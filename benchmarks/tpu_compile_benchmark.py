r"""Where the training step's cost goes on TPU, from the TPU compiler, on any machine.

    python benchmarks/tpu_compile_benchmark.py                          # the default matrix
    python benchmarks/tpu_compile_benchmark.py --models tiny_light --dtype bfloat16 \
        --remat off --topologies v5e:2x2 --impls depthwise=xla,depthwise=shift --max_batch

Each row compiles `train.py`'s train step (strip_mlp/train/compile_for.py: the config's
recipe, sharding, remat, dtype, grad accumulation) for a TPU topology over abstract
devices (libtpu, the `tpu` extra; no TPU) at `--batch_per_chip` images per chip, and
gives: memory per chip (arguments + outputs not donated + temporaries + code) against the
chip's HBM, FLOPs per image (the compiler's cost analysis of the per-chip program),
compile seconds on this machine, the op census of the compiled HLO (fused bodies
included), and a roofline estimate, max(FLOPs / peak bf16, bytes accessed / HBM
bandwidth), labelled an estimate: no time here is measured on a TPU. `--max_batch` adds the
largest batch per chip that fits (a search by compiling, `compile_for.max_batch`).
`--impls` compares formulations of Strip-MLP's ops (model.<kind>_impl=<value>). Rows run
in `--jobs` processes at once (compiles are mostly single-threaded).
"""

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top

STRIP_VARIANTS = ("tiny_light", "tiny", "small", "base")
DEFAULT_MODELS = STRIP_VARIANTS + ("poolformer_s12", "raftmlp_s", "msmlp_t")
CENSUS = ("total", "convolution", "fusion", "slice", "gather", "transpose", "copy")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
      "--models",
      default=",".join(DEFAULT_MODELS),
      help="Strip-MLP variants and relatives' variant names (strip_mlp.models.registry)",
  )
  p.add_argument(
      "--topologies",
      default="v5e:2x2,v5e:16x16",
      help="comma list of TPU topologies, e.g. one host and one pod",
  )
  p.add_argument("--remat", default="off,on", help="off,on (Strip-MLP only)")
  p.add_argument(
      "--impls",
      default="",
      help="comma list of kind=value formulations of "
      "Strip-MLP's ops, each a row set, e.g. depthwise=xla,depthwise=shift",
  )
  p.add_argument("--batch_per_chip", type=int, default=128)
  p.add_argument("--max_batch", action="store_true", help="also search the largest batch")
  p.add_argument("--jobs", type=int, default=1, help="rows compiled at once")
  bench_util.add_flags(p, "image_size", "dtype", "layers", "json", dtype="bfloat16,float32")
  return p.parse_args(argv)


def config_for(model: str, image_size: int, dtype: str, remat: bool, impl: str, layers=None):
  """The training config of `model` (a Strip-MLP variant, or family_variant) at this size;
  `layers` replaces a Strip-MLP variant's block counts (a quick compile)."""
  if model in STRIP_VARIANTS:
    from configs import common  # pylint: disable=g-import-not-at-top

    c = common.imagenet_config(model)
  else:
    family, _, variant = model.partition("_")
    c = importlib.import_module(f"configs.{family}").get_config(variant)
  c.data.image_size = image_size
  c.model.dtype = dtype
  if not c.model.get("name"):
    c.model.remat = remat
    if layers:
      c.model.layers = tuple(layers)
    if impl:
      kind, value = impl.split("=")
      c.model[f"{kind}_impl"] = value
  return c


def run_row(row: dict, batch_per_chip: int, max_batch: bool) -> dict:
  """Compiles one row (in a worker process) and fills in its figures."""
  from strip_mlp.runtime import tpu_topology  # pylint: disable=g-import-not-at-top
  from strip_mlp.train import compile_for  # pylint: disable=g-import-not-at-top

  devices = tpu_topology.devices(row["topology"])
  config = config_for(
      row["model"],
      row["image_size"],
      row["dtype"],
      row["remat"] == "on",
      row["impl"],
      row.get("layers"),
  )
  r = compile_for.compile_step(
      config, devices, topology=row["topology"], batch_per_chip=batch_per_chip
  )
  row.update(
      chips=r.chips,
      hbm_gib=round(r.chip.hbm_bytes / 2**30, 2),
      gib_per_chip=round(r.total_bytes / 2**30, 2),
      **{
          f"{k}_bytes": getattr(r, f"{k}_bytes")
          for k in ("argument", "output", "alias", "temp", "code")
      },
      fits="yes" if r.fits() else "refused by the compiler" if r.refused else "no",
      compile_s=round(r.compile_s, 1),
  )
  if not r.refused:  # a refused step has no FLOPs or op census
    row.update(
        gflop_per_image=round(r.flops / batch_per_chip / 1e9, 2),
        est_ms=round(1e3 * r.roofline_s, 1),
        est_img_s=round(batch_per_chip / r.roofline_s),
        bound="FLOPs"
        if r.flops / r.chip.peak_flops >= r.bytes_accessed / r.chip.hbm_bytes_per_s
        else "HBM",
        **{f"n_{op}": r.census.get(op, 0) for op in CENSUS},
    )
  if max_batch:
    best, tried = compile_for.max_batch(
        config,
        devices,
        topology=row["topology"],
        seen={batch_per_chip: r},
        log=lambda line: print(line, flush=True),
    )
    row["max_batch"] = best.batch_per_chip if best else 0
    row["search_compiles"] = len(tried)
    row["searched"] = {b: round(t.total_bytes / 2**30, 2) for b, t in sorted(tried.items())}
  return row


def main(argv=None):
  args = parse_args(argv)
  rows = []
  for model in bench_util.str_list(args.models):
    strip = model in STRIP_VARIANTS
    for topology in bench_util.str_list(args.topologies):
      for dtype in bench_util.str_list(args.dtype, bench_util.DTYPES):
        for remat in bench_util.str_list(args.remat, ("off", "on")) if strip else ("off",):
          for impl in (bench_util.str_list(args.impls) or [""]) if strip else [""]:
            rows.append(
                dict(
                    model=model,
                    topology=topology,
                    image_size=args.image_size,
                    dtype=dtype,
                    remat=remat,
                    impl=impl or "auto",
                    layers=bench_util.int_list(args.layers or ""),
                )
            )
  header = bench_util.machine_header(
      batch_per_chip=args.batch_per_chip, target="tpu (compiled here, not run)"
  )
  print(header, flush=True)
  t0 = time.time()
  jobs = [dict(r, impl="" if r["impl"] == "auto" else r["impl"]) for r in rows]
  if args.jobs > 1:
    pool = concurrent.futures.ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn")
    )
    results = pool.map(
        run_row, jobs, [args.batch_per_chip] * len(jobs), [args.max_batch] * len(jobs)
    )
  else:  # in this process
    results = (run_row(r, args.batch_per_chip, args.max_batch) for r in jobs)
  done = []
  for row in results:
    row["impl"] = row["impl"] or "auto"
    done.append(row)
    print(
        f"  {row['model']} {row['topology']} {row['dtype']} remat {row['remat']} "
        f"{row['impl']}: {row['gib_per_chip']} GiB, {row['compile_s']}s "
        f"({time.time() - t0:.0f}s)",
        flush=True,
    )
  columns = [
      ("model", "model"),
      ("topology", "topology"),
      ("dtype", "dtype"),
      ("remat", "remat"),
      ("impl", "ops"),
      ("gib_per_chip", "GiB/chip"),
      ("hbm_gib", "HBM GiB"),
      ("fits", "fits"),
  ]
  if args.max_batch:
    columns.append(("max_batch", "max batch/chip"))
  columns += [
      ("gflop_per_image", "GFLOP/img"),
      ("compile_s", "compile s"),
      ("est_ms", "est. ms/step"),
      ("est_img_s", "est. img/s/chip"),
      ("bound", "bound"),
  ]
  columns += [(f"n_{op}", op) for op in CENSUS]
  print(bench_util.markdown_table(done, columns))
  bench_util.write_json(args.json, header, args, done)


if __name__ == "__main__":
  main()
