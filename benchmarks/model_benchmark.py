r"""Model speed, ours and optionally the official PyTorch code's: inference and train-step images/s.

    python benchmarks/model_benchmark.py                     # tiny_light @224, batch 16, as shipped
    python benchmarks/model_benchmark.py --official_code PATH/TO/Strip_MLP    # side by side
    python benchmarks/model_benchmark.py --settings as_shipped,tuned --official_code PATH
    python benchmarks/model_benchmark.py --variants tiny,small --batch_size 16,64 \
        --dtype bfloat16 --json /tmp/bench.json

Every model runs in a fresh process of its own (benchmarks/jax_worker.py, and with
--official_code benchmarks/official_worker.py), all on the same synthetic inputs; their
steps alternate (one step each in turn, --repeats rounds after --warmup) and the table
gives medians. --settings picks how ours runs, one worker and one row each:
  as_shipped: plain jax.jit(model.apply) in a process started as train.py / eval.py
              start, with the package's mimalloc (strip_mlp/runtime/host_allocator.py),
  system_malloc: the same with glibc's allocator: what `import strip_mlp` in a script of
              your own gets,
  single_dot: as shipped, with XLA:CPU's YNNPACK limited to single dots for inference,
  tcmalloc:   as shipped, with tcmalloc preloaded (benchmarks/host_memory.py),
  tuned:      tcmalloc and single_dot together.
The official model runs with --official_malloc (default: the shell's, as it ships).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top
import host_memory  # noqa: E402  pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))
# XLA:CPU hands fused element-wise/reduction graphs to YNNPACK by default; limiting it to
# single dots lets XLA fuse the shifted sums, norms and GELU itself (inference only: the
# train step ran slower with it; see benchmarks/README.md).
SINGLE_DOT = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
SETTINGS = {  # name: (host_memory setting, compiler options of the inference function)
    "as_shipped": ("shipped", {}),
    "system_malloc": ("default", {}),
    "single_dot": ("shipped", SINGLE_DOT),
    "tcmalloc": ("tcmalloc", {}),
    "tuned": ("tcmalloc", SINGLE_DOT),
}
MODES = ("inference", "train")
COLUMNS = [
    ("variant", "variant"),
    ("image_size", "R"),
    ("batch", "batch"),
    ("dtype", "dtype"),
    ("mode", "mode"),
    ("setting", "setting"),
    ("allocator", "allocator"),
    ("images_per_s", "img/s"),
    ("step_ms", "step ms"),
    ("compile_s", "compile s"),
    ("gflops_per_image", "GFLOP/img"),
    ("achieved_tflops", "TFLOP/s"),
    ("peak_gib", "peak GiB"),
]
OFFICIAL_COLUMNS = [("official_images_per_s", "official img/s"), ("ratio", "ours/official")]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench_util.add_flags(
      p,
      "variants",
      "batch_size",
      "image_size",
      "dtype",
      "repeats",
      "warmup",
      "embed_dim",
      "layers",
      "json",
  )
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--modes", default="inference,train", help="comma list of inference, train")
  p.add_argument(
      "--settings", default="as_shipped", help=f"comma list of {', '.join(SETTINGS)} (see above)"
  )
  p.add_argument("--depthwise_impl", default="auto")
  p.add_argument("--patchify_impl", default="auto")
  p.add_argument(
      "--official_code",
      default=None,
      help="a checkout of the official code: also time its model (default: not)",
  )
  p.add_argument(
      "--official_malloc",
      default="default",
      choices=sorted(host_memory.SETTINGS),
      help="allocator setting of the official model's process",
  )
  p.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  p.add_argument(
      "--pause",
      type=float,
      default=0.5,
      help="seconds between alternating steps (idle threads spin a while)",
  )
  args = p.parse_args(argv)
  args.variants = bench_util.str_list(args.variants)
  args.batch_size = bench_util.int_list(args.batch_size)
  args.dtype = bench_util.str_list(args.dtype, bench_util.DTYPES)
  args.modes = bench_util.str_list(args.modes, MODES)
  args.settings = bench_util.str_list(args.settings, tuple(SETTINGS))
  if args.official_code and not os.path.isfile(
      os.path.join(args.official_code, "models", "strip_mlp.py")
  ):
    raise SystemExit(
        f"--official_code {args.official_code}: no models/strip_mlp.py there; "
        "give a checkout of github.com/Med-Process/Strip_MLP"
    )
  return args


def _model_spec(args, variant, dtype) -> dict:
  spec = dict(
      variant=variant,
      img_size=args.image_size,
      num_classes=args.num_classes,
      dtype=dtype,
      depthwise_impl=args.depthwise_impl,
      patchify_impl=args.patchify_impl,
  )
  if args.embed_dim:
    spec["embed_dim"] = args.embed_dim
  if args.layers:
    spec["layers"] = bench_util.int_list(args.layers)
  return spec


def _official_arch(spec) -> dict:
  """StripMLPNet's arguments for the model `spec` describes (variant sizes resolved here)."""
  sys.path.insert(0, os.path.dirname(HERE))
  from strip_mlp.models.strip_mlp import VARIANTS  # pylint: disable=g-import-not-at-top

  sizes = VARIANTS[spec["variant"]]
  return dict(
      img_size=spec["img_size"],
      num_classes=spec["num_classes"],
      embed_dim=spec.get("embed_dim", sizes["embed_dim"]),
      layers=list(spec.get("layers", sizes["layers"])),
  )


def _start_workers(args, spec, batch, tmp) -> dict:
  """{name: Worker}: ours once per setting, then the official model if asked for."""
  rng = np.random.default_rng(0)
  r = args.image_size
  images = rng.standard_normal((batch, r, r, 3), np.float32)
  labels = rng.integers(0, args.num_classes, batch).astype(np.int32)
  ours_inputs, their_inputs = os.path.join(tmp, "nhwc.npz"), os.path.join(tmp, "nchw.npz")
  np.savez(ours_inputs, images=images, labels=labels)
  workers = {}
  for setting in args.settings:
    malloc, options = SETTINGS[setting]
    job = dict(model=spec, inputs=ours_inputs, modes=args.modes, compiler_options=options)
    workers[setting] = bench_util.Worker(
        f"ours ({setting})",
        [sys.executable, os.path.join(HERE, "jax_worker.py"), json.dumps(job)],
        host_memory.environ_with(malloc),
    )
  if args.official_code:
    np.savez(their_inputs, images=images.transpose(0, 3, 1, 2), labels=labels)
    cmd = [
        sys.executable,
        os.path.join(HERE, "official_worker.py"),
        args.official_code,
        their_inputs,
        json.dumps(_official_arch(spec)),
        str(args.torch_threads),
        spec["dtype"],
    ]
    workers["official"] = bench_util.Worker(
        "official model", cmd, host_memory.environ_with(args.official_malloc)
    )
  return workers


def _rows(args, spec, batch, mode, workers, times) -> list:
  rows = []
  for setting in args.settings:
    info, sec = workers[setting].info, bench_util.median(times[setting])
    flops = info["modes"][mode]["flops"]
    row = dict(
        variant=spec["variant"] if not (args.embed_dim or args.layers) else "custom",
        image_size=args.image_size,
        batch=batch,
        dtype=spec["dtype"],
        mode=mode,
        setting=setting,
        allocator=info["allocator"],
        images_per_s=round(batch / sec, 2),
        step_ms=round(sec * 1e3, 1),
        compile_s=info["modes"][mode]["compile_s"],
        gflops_per_image=float(f"{flops / batch / 1e9:.4g}"),
        achieved_tflops=float(f"{flops / sec / 1e12:.4g}"),
    )
    if "official" in times:
      their_sec = bench_util.median(times["official"])
      row.update(official_images_per_s=round(batch / their_sec, 2), ratio=round(their_sec / sec, 2))
    rows.append(row)
  return rows


def benchmark(args) -> list:
  rows = []
  for variant in args.variants:
    for dtype in args.dtype:
      spec = _model_spec(args, variant, dtype)
      for batch in args.batch_size:
        with tempfile.TemporaryDirectory(prefix="smlp_bench_") as tmp:
          workers = _start_workers(args, spec, batch, tmp)
          new = []
          for mode in args.modes:
            steps = {name: (lambda w=w, m=mode: w.run(m)) for name, w in workers.items()}
            times = bench_util.interleave(steps, args.repeats, args.warmup, args.pause)
            new += _rows(args, spec, batch, mode, workers, times)
          for row in new:
            row["peak_gib"] = workers[row["setting"]].query_info().get("peak_gib")
            print(json.dumps(row), file=sys.stderr, flush=True)
          for worker in workers.values():
            worker.close()
          rows += new
  return rows


def main(argv=None):
  args = parse_args(argv)
  header = bench_util.machine_header(
      official_malloc=args.official_malloc if args.official_code else "-"
  )
  rows = benchmark(args)
  columns = COLUMNS + (OFFICIAL_COLUMNS if args.official_code else [])
  print(header)
  print(bench_util.markdown_table(rows, columns))
  bench_util.write_json(args.json, header, args, rows)
  return rows


if __name__ == "__main__":
  main()
