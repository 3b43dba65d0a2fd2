r"""Strip-MLP beside its relatives: size, FLOPs, speed, and accuracy under one recipe.

    python benchmarks/family_benchmark.py                          # both parts, defaults
    python benchmarks/family_benchmark.py --part speed --variants tiny_light,poolformer_s12
    python benchmarks/family_benchmark.py --part train --train_variants raftmlp_s \
        --seeds 0,1,2,3 --train_steps 120 --workdir /tmp/family_runs

Part `speed` (--variants, of any family, at --image_size with 1000 classes):
each model in a process of its own (jax_worker.py: plain `jax.jit(model.apply)` and a
forward + backward + AdamW step), all on the same synthetic batch, in one run; rows give
the parameter count, XLA's FLOPs per image (cost analysis of the compiled programs; a
multiply-add counts 2, so about twice the papers' "FLOPs", which count multiply-adds) and
the median images/s. --order blocks (default) times each model's steps in a row, the
models in turn, the sequence twice: the steady state of one process, as train.py runs.
--order interleaved alternates single steps (A B C A B C ...), which spreads the machine's
drift evenly but, with glibc's allocator, makes every step page-fault its buffers afresh
after another process's step (benchmarks/README.md); --malloc sets the workers' allocator
(default: the package's mimalloc, as train.py starts; mimalloc and tcmalloc keep freed
memory mapped, so each worker holds its peak: mind the memory).

Part `train`: `train.py` itself, once per model and seed, on the embedded digits with the
recipe of configs/default.py (AdamW, warmup + cosine, clipping, label smoothing; batch
64) for --train_steps steps, each family's model built at 32 px with 10 classes by
`--config.model.name`; rows give the final test top-1 per seed, their mean and sample
standard deviation, the last logged train loss (mean over seeds) and the median logged
train images/s (with the allocator train.py starts with). Each run's
workdir (metrics.jsonl, log.txt) is kept under --workdir when it is given.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top
import host_memory  # noqa: E402  pylint: disable=g-import-not-at-top
from strip_mlp.models import registry  # noqa: E402
from strip_mlp.models.strip_mlp import abstract_variables, count_params  # noqa: E402

# Comparable sizes: each family's smallest variant (~10-18M parameters) and the next one
# up (~21-29M); the larger variants can be named with --variants.
SPEED_VARIANTS = "poolformer_s12,raftmlp_s,tiny_light,poolformer_s24,raftmlp_m,tiny,msmlp_t"
TRAIN_VARIANTS = "poolformer_s12,raftmlp_s,tiny_light,msmlp_t"  # the smallest of each family
MODES = ("inference", "train")
SPEED_COLUMNS = [
    ("model", "model"),
    ("family", "family"),
    ("params_m", "params M"),
    ("gflops_inference", "GFLOP/img inference"),
    ("gflops_train", "GFLOP/img train step"),
    ("inference_images_per_s", "inference img/s"),
    ("train_images_per_s", "train img/s"),
    ("compile_s", "compile s (inf + train)"),
    ("allocator", "allocator"),
]
TRAIN_COLUMNS = [
    ("model", "model"),
    ("family", "family"),
    ("params_m", "params M (32 px, 10 classes)"),
    ("steps", "steps"),
    ("seeds", "seeds"),
    ("top1_mean", "top-1 % mean"),
    ("top1_std", "top-1 % std"),
    ("top1_each", "top-1 % per seed"),
    ("loss_mean", "final train loss"),
    ("train_images_per_s", "train img/s"),
]
DIGITS = dict(image_size=32, num_classes=10)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench_util.add_flags(p, "image_size", "dtype", "repeats", "warmup", "json", dtype="float32")
  p.add_argument("--part", default="speed,train", help="comma list of speed, train")
  p.add_argument(
      "--variants", default=SPEED_VARIANTS, help="speed: comma list of variants of any family"
  )
  p.add_argument("--batch_size", type=int, default=16, help="speed: images per step")
  p.add_argument(
      "--pause",
      type=float,
      default=0.5,
      help="speed: seconds between interleaved steps (idle threads spin a while)",
  )
  p.add_argument(
      "--order",
      default="blocks",
      choices=("blocks", "interleaved"),
      help="speed: each model's steps in a row, the models in turn, twice (blocks), or one "
      "step each in turn (interleaved; see bench_util)",
  )
  p.add_argument(
      "--malloc",
      default="shipped",
      choices=sorted(host_memory.SETTINGS),
      help="speed: host allocator of every worker (tcmalloc: see benchmarks/README.md)",
  )
  p.add_argument("--train_variants", default=TRAIN_VARIANTS, help="train: comma list of variants")
  p.add_argument("--seeds", default="0,1,2", help="train: comma list of seeds")
  p.add_argument("--train_steps", type=int, default=60, help="train: steps per run")
  p.add_argument(
      "--train_flag",
      action="append",
      default=[],
      help="train: a train.py flag for every run (repeatable), e.g. "
      "--train_flag=--config.batch_size=32",
  )
  p.add_argument("--workdir", default=None, help="train: keep the runs here (default: a tmp dir)")
  args = p.parse_args(argv)
  args.part = bench_util.str_list(args.part, ("speed", "train"))
  args.dtype = bench_util.str_list(args.dtype, bench_util.DTYPES)
  if len(args.dtype) != 1:
    raise SystemExit("--dtype: one compute dtype per run")
  args.dtype = args.dtype[0]
  args.seeds = bench_util.int_list(args.seeds)
  known = registry.all_variants()
  args.variants = bench_util.str_list(args.variants, tuple(known))
  args.train_variants = bench_util.str_list(args.train_variants, tuple(known))
  if args.train_steps < 1 or not args.seeds:
    raise SystemExit("--train_steps must be >= 1 and --seeds must name at least one seed")
  return args


def model_kwargs(name: str, image_size: int, num_classes: int, dtype: str = "float32") -> dict:
  """Constructor overrides of variant `name` for this input (img_size only where the
  family has one: PoolFormer and MS-MLP take any size with the same parameters)."""
  kw = dict(num_classes=num_classes, dtype=dtype)
  if registry.family_of_variant(name).has_img_size():
    kw["img_size"] = image_size
  return kw


def param_count(name: str, image_size: int, num_classes: int) -> int:
  """Parameters of variant `name` built for this input (shapes only, nothing allocated)."""
  model = registry.create(name, **model_kwargs(name, image_size, num_classes))
  return count_params(abstract_variables(model)["params"])


def family_name(name: str) -> str:
  return registry.family_of_variant(name).name


# ---- part speed


def speed(args) -> list:
  """One row per model: parameters, FLOPs and median images/s, all measured side by side."""
  rng = np.random.default_rng(0)
  r, batch = args.image_size, args.batch_size
  with tempfile.TemporaryDirectory(prefix="smlp_family_") as tmp:
    inputs = os.path.join(tmp, "nhwc.npz")
    np.savez(
        inputs,
        images=rng.standard_normal((batch, r, r, 3), np.float32),
        labels=rng.integers(0, 1000, batch).astype(np.int32),
    )
    workers = {}
    try:
      for name in args.variants:
        spec = dict(variant=name, **model_kwargs(name, r, 1000, args.dtype))
        job = dict(model=spec, inputs=inputs, modes=list(MODES), compiler_options={})
        print(f"[speed] compiling {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.join(HERE, "jax_worker.py"), json.dumps(job)]
        workers[name] = bench_util.Worker(name, cmd, host_memory.environ_with(args.malloc))
      times = {}
      for mode in MODES:
        print(f"[speed] timing {mode} ({args.order})", file=sys.stderr, flush=True)
        steps = {name: (lambda w=w, m=mode: w.run(m)) for name, w in workers.items()}
        if args.order == "blocks":
          times[mode] = bench_util.in_blocks(steps, args.repeats, args.warmup)
        else:
          times[mode] = bench_util.interleave(steps, args.repeats, args.warmup, args.pause)
    finally:
      for worker in workers.values():
        worker.close()
  rows = []
  for name, worker in workers.items():
    info = worker.info
    row = dict(model=name, family=family_name(name), params_m=round(info["params"] / 1e6, 2))
    row["allocator"] = info["allocator"]
    for mode in MODES:
      sec = bench_util.median(times[mode][name])
      row[f"gflops_{mode}"] = round(info["modes"][mode]["flops"] / batch / 1e9, 2)
      row[f"{mode}_images_per_s"] = round(batch / sec, 2)
    row["compile_s"] = round(sum(info["modes"][m]["compile_s"] for m in MODES), 1)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


# ---- part train


def read_run(workdir: str) -> dict:
  """The final eval top-1 and the last train row of one run's metrics.jsonl."""
  last_train, last_eval, speeds = None, None, []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row["kind"] == "train":
        last_train = row
        speeds.append(row.get("images_per_sec"))
      elif row["kind"] == "eval":
        last_eval = row
  if last_eval is None or last_train is None:
    raise SystemExit(f"{workdir}: the run wrote no eval or train metrics (see its log.txt)")
  speeds = [s for s in speeds[1:] if s is not None]  # the first interval holds warm-up
  return dict(
      step=last_eval["step"],
      top1=100 * last_eval["top1"],
      loss=last_train["loss"],
      images_per_s=statistics.median(speeds) if speeds else None,
  )


def train_one(name: str, seed: int, args, workdir: str) -> dict:
  """Runs train.py for one model and seed (same recipe for all); its output -> log.txt."""
  cmd = [
      sys.executable,
      os.path.join(REPO, "train.py"),
      f"--workdir={workdir}",
      f"--config.model.name={name}",
      f"--config.seed={seed}",
      f"--config.num_steps={args.train_steps}",
      f"--config.model.dtype={args.dtype}",
      *args.train_flag,
  ]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "log.txt"), "w") as log:
    done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
  if done.returncode:
    raise SystemExit(
        f"train.py failed for {name} seed {seed} (exit {done.returncode}); "
        f"see {os.path.join(workdir, 'log.txt')}"
    )
  return read_run(workdir)


def summarize(name: str, runs: list, params: int) -> dict:
  """One table row from the runs of one model (the same steps, one seed each)."""
  top1 = [r["top1"] for r in runs]
  speeds = [r["images_per_s"] for r in runs if r["images_per_s"] is not None]
  return dict(
      model=name,
      family=family_name(name),
      params_m=round(params / 1e6, 2),
      steps=runs[0]["step"],
      seeds=len(runs),
      top1_mean=round(statistics.mean(top1), 2),
      top1_std=round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
      top1_each=" / ".join(f"{t:.2f}" for t in top1),
      loss_mean=round(statistics.mean(r["loss"] for r in runs), 3),
      train_images_per_s=round(statistics.median(speeds), 1) if speeds else None,
  )


def train(args) -> list:
  """One row per model: test top-1 over the seeds after the same steps of one recipe."""
  root = args.workdir or tempfile.mkdtemp(prefix="smlp_family_runs_")
  rows = []
  for name in args.train_variants:
    runs = []
    for seed in args.seeds:
      t0 = time.time()
      workdir = os.path.join(root, f"{name}_seed{seed}")
      runs.append(train_one(name, seed, args, workdir))
      print(
          f"[train] {name} seed {seed}: top-1 {runs[-1]['top1']:.2f}% after "
          f"{runs[-1]['step']} steps ({time.time() - t0:.0f} s)",
          file=sys.stderr,
          flush=True,
      )
    rows.append(summarize(name, runs, param_count(name, **DIGITS)))
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return rows


def main(argv=None):
  args = parse_args(argv)
  header = bench_util.machine_header(dtype=args.dtype)
  result = {}
  if "speed" in args.part:
    result["speed"] = speed(args)
  if "train" in args.part:
    result["train"] = train(args)
  print(header)
  if "speed" in result:
    print(f"\nSpeed: {args.image_size} px, 1000 classes, batch {args.batch_size}, {args.dtype}")
    print(bench_util.markdown_table(result["speed"], SPEED_COLUMNS))
  if "train" in result:
    print(f"\nTraining: embedded digits, configs/default.py recipe, {args.train_steps} steps")
    print(bench_util.markdown_table(result["train"], TRAIN_COLUMNS))
  bench_util.write_json(args.json, header, args, result.get("speed", []) + result.get("train", []))
  return result


if __name__ == "__main__":
  main()
