r"""Train-step throughput of the published recipe (AdamW, mixup/cutmix, drop path, clipping).

    python benchmarks/train_step_benchmark.py                    # tiny_light, 224, batch 16
    python benchmarks/train_step_benchmark.py --dtype float32,bfloat16 --image_size 64
    python benchmarks/train_step_benchmark.py --variants base --batch_size 128 --repeats 20

Synthetic images (the input pipeline is not measured), the jitted, donated train step of
strip_mlp.train.build (what train.py compiles) on all local devices; prints a table row per variant.
"""

import argparse
import os
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import common  # noqa: E402
from strip_mlp import count_params  # noqa: E402
from strip_mlp.runtime import sharding  # noqa: E402
from strip_mlp.train.build import build  # noqa: E402

IMAGENET = types.SimpleNamespace(num_train=1_281_167, num_eval=50_000, num_classes=1000)


def benchmark(args, variant: str, batch: int, dtype: str) -> dict:
  """One row: the train step of `variant` (or the custom size) at this batch and dtype."""
  config = common.imagenet_config(variant)
  config.unlock()
  config.batch_size = batch
  config.data.image_size = args.image_size
  config.model.dtype = dtype
  if args.embed_dim or args.layers:
    config.model.variant = ""
    config.model.embed_dim = args.embed_dim or 80
    config.model.layers = tuple(bench_util.int_list(args.layers or "2,2,6,2"))
  mesh = sharding.create_mesh(config.mesh.fsdp)
  run = build(config, IMAGENET, mesh)  # exactly what train.py compiles
  rng = np.random.RandomState(0)
  size = args.image_size
  data = {
      "image": rng.randn(batch, size, size, 3).astype(np.float32),
      "label": rng.randint(0, run.plan.num_classes, batch).astype(np.int32),
  }
  data = sharding.put_global(data, sharding.batch_sharding(mesh))
  state = run.init(jax.random.key(0))
  t0 = time.perf_counter()
  compiled = run.train_step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def step():
    box["state"], metrics = compiled(box["state"], data)
    jax.block_until_ready(metrics)

  times = bench_util.interleave({"step": bench_util.timed(step)}, args.repeats, args.warmup)
  step_s = bench_util.median(times["step"])
  return {
      "variant": variant if not (args.embed_dim or args.layers) else "custom",
      "image_size": size,
      "batch": batch,
      "dtype": dtype,
      "params_m": round(count_params(box["state"].params) / 1e6, 2),
      "compile_s": round(compile_s, 1),
      "step_s": round(step_s, 4),
      "images_per_s": round(batch / step_s, 2),
  }


COLUMNS = [
    ("variant", "variant"),
    ("image_size", "R"),
    ("batch", "batch"),
    ("dtype", "dtype"),
    ("params_m", "params M"),
    ("compile_s", "compile s"),
    ("step_s", "step s"),
    ("images_per_s", "img/s"),
]


def main(argv=None) -> list:
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
  args = p.parse_args(argv)
  header = bench_util.machine_header()
  print(header, flush=True)
  rows = [
      benchmark(args, v, b, d)
      for v in bench_util.str_list(args.variants, tuple(common.VARIANTS))
      for b in bench_util.int_list(args.batch_size)
      for d in bench_util.str_list(args.dtype, bench_util.DTYPES)
  ]
  print(bench_util.markdown_table(rows, COLUMNS), flush=True)
  if args.json:
    bench_util.write_json(args.json, header, args, rows)
  return rows


if __name__ == "__main__":
  main()
