r"""How much of a step its products alone take: each dot and convolution compiled by itself.

    python benchmarks/product_floor_benchmark.py                   # tiny_light @224, batch 16
    python benchmarks/product_floor_benchmark.py --modes train --variants poolformer_s12

Collects every `dot_general` and `conv_general_dilated` the step computes on this backend
(inference: `jax.jit(model.apply)`; train: forward, backward and AdamW as in
`jax_worker.py`; `lax.platform_dependent` branches of other backends are skipped), compiles
each distinct one alone on inputs of its shapes, and times it. Their sum is what the step's
products cost at the speed XLA runs them one at a time: the step cannot run faster than
that unless its products do. Prints one table of the products (largest total first) and
one row per variant and mode: the products' sum against the whole step, both timed here.
Runs as the programs run (re-executed with the package's allocator), so that products with
large outputs are not charged fresh page faults per call.
"""

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from strip_mlp.runtime import host_allocator  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host_allocator.use_packaged_allocator("product_floor_benchmark.py")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
import optax  # noqa: E402  pylint: disable=g-import-not-at-top
from jax.extend import core as jax_core  # noqa: E402  pylint: disable=g-import-not-at-top

import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top
import family_benchmark  # noqa: E402  pylint: disable=g-import-not-at-top
import jax_worker  # noqa: E402  pylint: disable=g-import-not-at-top
from strip_mlp.models import registry  # noqa: E402  pylint: disable=g-import-not-at-top

PRODUCTS = ("dot_general", "conv_general_dilated")
PRODUCT_COLUMNS = [
    ("variant", "variant"),
    ("mode", "mode"),
    ("op", "op"),
    ("lhs", "lhs"),
    ("rhs", "rhs"),
    ("count", "count"),
    ("ms_each", "ms each"),
    ("gflops_per_s", "GFLOP/s"),
    ("ms_total", "ms total"),
]
STEP_COLUMNS = [
    ("variant", "variant"),
    ("image_size", "R"),
    ("batch", "batch"),
    ("mode", "mode"),
    ("products", "products"),
    ("product_gflops_per_image", "product GFLOP/img"),
    ("gflops_per_image", "all GFLOP/img"),
    ("products_ms", "products alone ms"),
    ("step_ms", "step ms"),
    ("products_share", "products / step"),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench_util.add_flags(p, "variants", "batch_size", "image_size", "repeats", "embed_dim", "layers")
  p.add_argument("--modes", default="inference,train", help="comma list of inference, train")
  p.add_argument("--num_classes", type=int, default=1000)
  args = p.parse_args(argv)
  args.variants = bench_util.str_list(args.variants)
  args.batch_size = bench_util.int_list(args.batch_size)
  args.modes = bench_util.str_list(args.modes, ("inference", "train"))
  return args


def products(jaxpr, platform: str, times: int = 1, found=None) -> collections.Counter:
  """{(primitive, input avals, params): count} of the products `jaxpr` computes on `platform`.

  Recurses into every sub-computation (a scan's body counted `length` times); of a `cond`
  made by `lax.platform_dependent` only the branch `platform` runs is counted.
  """
  found = collections.Counter() if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in PRODUCTS:
      avals = tuple(v.aval for v in eqn.invars)
      found[(eqn.primitive, avals, tuple(sorted(eqn.params.items())))] += times
      continue
    subs = [p for value in eqn.params.values() for p in _jaxprs(value)]
    platforms = eqn.params.get("branches_platforms")
    if eqn.primitive.name == "cond" and platforms:
      index = next(i for i, names in enumerate(platforms) if names is None or platform in names)
      subs = [eqn.params["branches"][index].jaxpr]
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in subs:
      products(sub, platform, times * repeat, found)
  return found


def _jaxprs(value):
  for item in value if isinstance(value, (tuple, list)) else (value,):
    if isinstance(item, jax_core.ClosedJaxpr):
      yield item.jaxpr
    elif isinstance(item, jax_core.Jaxpr):
      yield item


def _seconds(fn, args, repeats) -> float:
  jax.block_until_ready(fn(*args))
  return bench_util.median(
      [bench_util.timed(lambda: jax.block_until_ready(fn(*args)))() for _ in range(repeats)]
  )


def time_product(primitive, avals, params, repeats: int) -> tuple:
  """(seconds, FLOPs) of one product compiled alone on random inputs of `avals`."""
  rng = np.random.RandomState(0)
  args = [jax.numpy.asarray(rng.rand(*a.shape).astype(a.dtype)) for a in avals]
  compiled = jax.jit(lambda *a: primitive.bind(*a, **dict(params))).lower(*args).compile()
  return _seconds(compiled, args, repeats), jax_worker.flops(compiled)


def _step(model, mode, variables, images, labels):
  """(the step's function, its arguments) for `mode`."""
  if mode == "inference":
    return lambda v, x: model.apply(v, x, train=False), (variables, images)
  tx = optax.adamw(1e-3, weight_decay=0.05)
  step = jax_worker.make_train_step(model, tx)
  return step, (variables, tx.init(variables["params"]), images, labels, jax.random.key(1))


def benchmark(args) -> tuple:
  """(product rows, step rows) for every variant, batch size and mode."""
  product_rows, step_rows = [], []
  for variant in args.variants:
    kw = family_benchmark.model_kwargs(variant, args.image_size, args.num_classes)
    if args.embed_dim:
      kw["embed_dim"] = args.embed_dim
    if args.layers:
      kw["layers"] = tuple(bench_util.int_list(args.layers))
    model = registry.create(variant, **kw)
    name = "custom" if args.embed_dim or args.layers else variant
    size = args.image_size
    variables = jax.jit(lambda k: model.init(k, jax.numpy.zeros((1, size, size, 3)), train=False))(
        jax.random.key(0)
    )
    for batch in args.batch_size:
      rng = np.random.RandomState(0)
      images = rng.randn(batch, args.image_size, args.image_size, 3).astype(np.float32)
      labels = rng.randint(0, args.num_classes, batch).astype(np.int32)
      for mode in args.modes:
        fn, fn_args = _step(
            model, mode, variables, jax.numpy.asarray(images), jax.numpy.asarray(labels)
        )
        found = products(jax.make_jaxpr(fn)(*fn_args).jaxpr, jax.default_backend())
        total_s = total_flops = 0.0
        for (primitive, avals, params), count in found.items():
          seconds, flops = time_product(primitive, avals, params, args.repeats)
          total_s += count * seconds
          total_flops += count * flops
          product_rows.append(
              dict(
                  variant=name,
                  mode=mode,
                  op=primitive.name,
                  lhs=avals[0].str_short(),
                  rhs=avals[1].str_short(),
                  count=count,
                  ms_each=round(1e3 * seconds, 2),
                  gflops_per_s=round(flops / seconds / 1e9),
                  ms_total=round(1e3 * count * seconds, 1),
              )
          )
        compiled = jax.jit(fn).lower(*fn_args).compile()
        step_s = _seconds(compiled, fn_args, args.repeats)
        step_rows.append(
            dict(
                variant=name,
                image_size=args.image_size,
                batch=batch,
                mode=mode,
                products=sum(found.values()),
                product_gflops_per_image=round(total_flops / batch / 1e9, 3),
                gflops_per_image=round(jax_worker.flops(compiled) / batch / 1e9, 3),
                products_ms=round(1e3 * total_s, 1),
                step_ms=round(1e3 * step_s, 1),
                products_share=round(total_s / step_s, 2),
            )
        )
  product_rows.sort(key=lambda r: -r["ms_total"])
  return product_rows, step_rows


def main(argv=None):
  args = parse_args(argv)
  header = bench_util.machine_header()
  product_rows, step_rows = benchmark(args)
  print(header)
  print(bench_util.markdown_table(product_rows, PRODUCT_COLUMNS))
  print()
  print(bench_util.markdown_table(step_rows, STEP_COLUMNS))
  return product_rows, step_rows


if __name__ == "__main__":
  main()
