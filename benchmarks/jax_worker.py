r"""Our model in a process of its own, timed step by step for the model and family benchmarks.

    python benchmarks/jax_worker.py SPEC_JSON

SPEC_JSON: {"model": constructor keyword arguments plus "variant", a variant of any family
(strip_mlp.models.registry: "tiny_light", "poolformer_s12", ...), "inputs": an .npz with `images`
(N, R, R, 3) float32 and `labels` (N,) int32, "modes": ["inference", "train"],
"compiler_options": {XLA option: value} for the inference function (empty as shipped)}.

The worker starts as train.py and eval.py do, re-executed with the package's allocator
(strip_mlp/runtime/host_allocator.py) unless its environment says
STRIP_MLP_ALLOCATOR=system or preloads another. Inference is `jax.jit(model.apply)` in
eval mode; the train step is forward, backward and an AdamW update (optax, weight decay
0.05), jitted with the state donated, dropout paths drawn as in training. Both are
compiled before the worker reports ready; its first line (see `bench_util.serve`) gives
the parameter count and per mode the compile seconds and XLA's FLOP count per step.
"""

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from strip_mlp.runtime import host_allocator  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host_allocator.use_packaged_allocator("jax_worker.py")  # as train.py and eval.py do

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
import optax  # noqa: E402  pylint: disable=g-import-not-at-top

import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top
from strip_mlp import count_params  # noqa: E402  pylint: disable=g-import-not-at-top
from strip_mlp.models import registry  # noqa: E402  pylint: disable=g-import-not-at-top


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _peak_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


def make_train_step(model, tx):
  """Forward, backward and `tx`'s update of `model`: (variables, opt_state, images, labels,
  rng) -> (variables, opt_state, loss)."""

  def train_step(variables, opt_state, images, labels, rng):
    def loss_fn(params):
      logits, state = model.apply(
          {**variables, "params": params},
          images,
          train=True,
          rngs={"drop_path": rng},
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {"params": params, **state}, opt_state, loss

  return train_step


def main(spec):
  model_kw = dict(spec["model"])
  model = registry.create(model_kw.pop("variant"), **model_kw)
  data = np.load(spec["inputs"])
  images, labels = jax.device_put(data["images"]), jax.device_put(data["labels"])
  variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.key(0))
  tx = optax.adamw(1e-3, weight_decay=0.05)
  state = {"variables": variables, "opt_state": jax.jit(tx.init)(variables["params"])}
  rng = jax.random.key(1)
  infer = jax.jit(functools.partial(model.apply, train=False))
  train = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
  info, compiled = {}, {}
  for mode in spec["modes"]:
    t0 = time.perf_counter()
    if mode == "inference":
      compiled[mode] = infer.lower(variables, images).compile(
          compiler_options=spec["compiler_options"] or None
      )
    else:
      compiled[mode] = train.lower(
          state["variables"], state["opt_state"], images, labels, rng
      ).compile()
    info[mode] = {"compile_s": round(time.perf_counter() - t0, 2), "flops": flops(compiled[mode])}

  info = {
      "params": count_params(variables["params"]),
      "modes": info,
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "allocator": bench_util.allocator(),
  }

  def step(mode):
    if mode == "inference":
      compiled[mode](state["variables"], images).block_until_ready()
    else:
      state["variables"], state["opt_state"], loss = compiled[mode](
          state["variables"], state["opt_state"], images, labels, rng
      )
      loss.block_until_ready()
    info["peak_gib"] = _peak_gib()

  bench_util.serve(info, step)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
