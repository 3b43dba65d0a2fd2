r"""Backbone costs: train-step memory and time with and without remat, windowed compiles.

    python benchmarks/backbone_benchmark.py                     # tiny_light, 224 and 384
    python benchmarks/backbone_benchmark.py --variant tiny --img_sizes 224 --batch 16 \
        --input_sizes 224x224,256x320,512x512,800x1216 --json /tmp/backbone.json

Part 1, per img_size (the model trained at that size, inputs of that size) and remat
off/on: the train step (forward, backward, SGD update; training-mode BatchNorm and drop
path) is compiled once and timed; memory is XLA's own account of the compiled step
(`compiled.memory_analysis()`: temporaries + arguments + outputs - donated aliases), so it
is XLA's figure for this backend, plus the device's peak where it reports one, and the
activations the forward keeps for the backward (traced, backend-independent: what remat
controls; XLA:CPU's schedule does not turn that into a lower total, see the README).
Part 2: the model built at the first img_size is compiled for inference at each input
size (the strip layers on overlapping windows wherever the size differs): compile seconds,
forward seconds per batch, and how many windows each stage runs.
Synthetic data. The load average is printed before and after: on a shared machine the
times move with it (the memory figures do not).
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from strip_mlp import create_model  # noqa: E402  pylint: disable=g-import-not-at-top
from strip_mlp.models import windows  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="tiny_light")
  p.add_argument("--img_sizes", default="224,384", help="training sizes for part 1")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
  p.add_argument(
      "--input_sizes", default="224x224,256x320,512x512", help="HxW inputs for part 2 ('' skips it)"
  )
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _memory_gib(compiled):
  """XLA's account of a compiled program's memory, GiB (None if it gives none)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  total = (
      m.temp_size_in_bytes
      + m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
  )
  return total / 2**30


def _device_peak_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def residual_gib(model, variables, x, rng):
  """GiB the forward pass keeps for the backward (the leaves of jax.vjp's closure; traced
  only): what remat controls, independent of how a backend schedules the step."""

  def loss(params):
    logits, _ = model.apply(
        {**variables, "params": params},
        x,
        train=True,
        rngs={"drop_path": rng},
        mutable=["batch_stats"],
    )
    return jnp.sum(logits)

  closure = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], variables["params"])
  return sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(closure)) / 2**30


def train_step_row(args, size, remat):
  """Compile and time one SGD train step of the model trained at `size`."""
  model = create_model(args.variant, img_size=size, remat=remat, dtype=args.dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, size, size, 3))
  y = jnp.arange(args.batch) % model.num_classes
  variables = jax.jit(lambda k: model.init(k, x[:1]))(jax.random.PRNGKey(1))

  def step(variables, rng):
    def loss_fn(params):
      logits, state = model.apply(
          {**variables, "params": params},
          x,
          train=True,
          rngs={"drop_path": rng},
          mutable=["batch_stats"],
      )
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, variables["params"], grads)
    return {"params": params, **state}, loss

  rng = jax.random.PRNGKey(2)
  residuals = residual_gib(model, variables, x, rng)
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(variables, rng).compile()
  compile_s = time.perf_counter() - t
  state = {"v": compiled(variables, rng)[0]}

  def run():
    state["v"], loss = compiled(state["v"], rng)
    return loss

  step_s = _median_seconds(run, args.repeats)
  return dict(
      img_size=size,
      remat=remat,
      batch=args.batch,
      compile_s=compile_s,
      step_s=step_s,
      residual_gib=residuals,
      xla_memory_gib=_memory_gib(compiled),
      device_peak_gib=_device_peak_gib(),
  )


def window_row(args, model, variables, h, w):
  """Compile and time inference of `model` at an h x w input."""
  x = jax.random.normal(jax.random.PRNGKey(3), (args.batch, h, w, 3))
  t = time.perf_counter()
  compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
  compile_s = time.perf_counter() - t
  forward_s = _median_seconds(lambda: compiled(variables, x), args.repeats)
  counts = []
  for s in range(4):
    length, r = model.img_size // 4 // 2**s, 4 * 2**s
    counts.append(
        len(windows.axis_plan(h // r, length).starts)
        * len(windows.axis_plan(w // r, length).starts)
    )
  return dict(input=f"{h}x{w}", compile_s=compile_s, forward_s=forward_s, windows_per_stage=counts)


def main(argv=None):
  args = parse_args(argv)
  print(
      f"# {args.variant}, batch {args.batch}, {args.dtype}, {jax.devices()[0].device_kind}"
      f" ({jax.default_backend()}); load average before: {os.getloadavg()}"
  )
  train_rows = [
      train_step_row(args, int(s), remat)
      for s in args.img_sizes.split(",")
      for remat in (False, True)
  ]
  print(
      "\n| img_size | remat | compile s | step s | residuals GiB | XLA memory GiB | "
      "device peak GiB |"
  )
  print("|---|---|---|---|---|---|---|")
  for r in train_rows:
    peak = "-" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.2f}"
    print(
        f"| {r['img_size']} | {r['remat']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
        f"{r['residual_gib']:.3f} | {r['xla_memory_gib']:.3f} | {peak} |"
    )
  window_rows = []
  if args.input_sizes:
    base = int(args.img_sizes.split(",")[0])
    model = create_model(args.variant, img_size=base, dtype=args.dtype)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, base, base, 3))))(
        jax.random.PRNGKey(1)
    )
    for hw in args.input_sizes.split(","):
      h, w = (int(v) for v in hw.split("x"))
      window_rows.append(window_row(args, model, variables, h, w))
    print(f"\nInference of the {base}-px model (batch {args.batch}) at other input sizes:")
    print("| input | windows per stage | compile s | forward s |")
    print("|---|---|---|---|")
    for r in window_rows:
      print(
          f"| {r['input']} | {'/'.join(map(str, r['windows_per_stage']))} | "
          f"{r['compile_s']:.1f} | {r['forward_s']:.3f} |"
      )
  print(f"\nload average after: {os.getloadavg()}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          {
              "args": vars(args),
              "train": train_rows,
              "windowed": window_rows,
              "device": jax.devices()[0].device_kind,
          },
          f,
          indent=2,
      )
  return train_rows, window_rows


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
