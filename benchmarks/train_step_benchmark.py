r"""Train-step throughput of the published recipe (AdamW, mixup/cutmix, drop path, clipping).

    python benchmarks/train_step_benchmark.py                       # tiny_light, 224, batch 16,
                                                                    # float32 and bfloat16
    python benchmarks/train_step_benchmark.py --variant base --batch 128 --steps 20

Synthetic images (the input pipeline is not measured), the jitted, donated train step of
strip_mlp.build (what train.py compiles) on all local devices; prints a table row per variant.
"""
import argparse
import os
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from strip_mlp import count_params, sharding  # noqa: E402
from strip_mlp.build import build  # noqa: E402

IMAGENET = types.SimpleNamespace(num_train=1_281_167, num_eval=50_000, num_classes=1000)


def benchmark(variant: str, image_size: int, batch: int, steps: int, warmup: int,
              dtype: str) -> dict:
  config = common.imagenet_config(variant)
  config.unlock()
  config.batch_size = batch
  config.data.image_size = image_size
  config.model.dtype = dtype
  mesh = sharding.create_mesh(config.mesh.fsdp)
  run = build(config, IMAGENET, mesh)   # exactly what train.py compiles
  plan, init, step = run.plan, run.init, run.train_step
  rng = np.random.RandomState(0)
  data = {"image": rng.randn(batch, image_size, image_size, 3).astype(np.float32),
          "label": rng.randint(0, plan.num_classes, batch).astype(np.int32)}
  data = sharding.put_global(data, sharding.batch_sharding(mesh))
  t0 = time.perf_counter()
  state = init(jax.random.key(0))
  jax.block_until_ready(state)
  t_init = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  t_compile = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return {"variant": variant, "res": image_size, "batch": batch, "dtype": dtype,
          "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
          "params": count_params(state.params), "init_s": t_init, "compile_s": t_compile,
          "step_s": step_s, "img_s": batch / step_s, "loss": float(metrics["loss"])}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", nargs="+", default=["tiny_light"], choices=common.VARIANTS)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                 choices=["float32", "bfloat16"], help="compute dtypes, one row each")
  args = p.parse_args()
  print("| variant | res | batch | dtype | devices | params | compile s | step s | img/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for v, dtype in [(v, d) for v in args.variant for d in args.dtype]:
    r = benchmark(v, args.image_size, args.batch, args.steps, args.warmup, dtype)
    print(f"| {r['variant']} | {r['res']} | {r['batch']} | {r['dtype']} | {r['devices']} | "
          f"{r['params'] / 1e6:.2f}M | {r['compile_s']:.0f} | {r['step_s']:.3f} | "
          f"{r['img_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
