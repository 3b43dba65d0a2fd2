r"""Model speed on whatever backend JAX has: inference and train-step images/s per variant.

    python benchmarks/model_benchmark.py                       # tiny_light @224, batch 16
    python benchmarks/model_benchmark.py --variants tiny_light,tiny,small,base \
        --batch_sizes 16,64 --dtype bfloat16 --json /tmp/bench.json
    python benchmarks/model_benchmark.py --torch_baseline ~/src/Strip_MLP   # side by side

Prints a markdown table (and writes JSON with --json): compile time, inference and
train-step (forward + backward + AdamW update) images/s, peak device memory where the
backend reports it, model FLOPs per image from XLA's cost analysis and achieved FLOP/s.
With --torch_baseline DIR (a checkout of the official PyTorch code, which needs timm),
the official model is timed in the same run on the same inputs, alternating runs (in a
worker process of its own), and the table gets the ratio ours/theirs in images/s.
Synthetic data: no dataset is read.
--malloc picks the host allocator setting for both processes (strip_mlp/host_memory.py): on
CPU it decides whether XLA's per-step temporary buffer is page-faulted in every step
(`--malloc tcmalloc` was fastest for both models on the README's machine); --torch_malloc
gives the official model's process a setting of its own (e.g. `default`, as it ships).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from strip_mlp import create_model, host_memory, ops  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", default="tiny_light")
  p.add_argument("--batch_sizes", default="16")
  p.add_argument("--img_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--depthwise_impl", default="auto")
  p.add_argument("--patchify_impl", default="auto")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
  p.add_argument("--modes", default="inference,train")
  p.add_argument("--torch_baseline", default=None, help="checkout of the official code")
  p.add_argument("--torch_threads", type=int, default=None)
  p.add_argument("--pause", type=float, default=1.0,
                 help="seconds between alternating runs (OpenMP/XLA threads spin a while)")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--malloc", default="default", choices=sorted(host_memory.SETTINGS),
                 help="allocator setting for both processes on Linux (the script "
                      "restarts itself with it); see strip_mlp/host_memory.py")
  p.add_argument("--torch_malloc", default=None, choices=sorted(host_memory.SETTINGS),
                 help="a different allocator setting for the official model's process")
  # Custom sizes (override the variant's): e.g. --embed_dim 16 --layers 1,1,1,1
  p.add_argument("--embed_dim", type=int, default=None)
  p.add_argument("--layers", default=None)
  return p.parse_args(argv)


def _seconds(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _peak_memory():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


class JaxRunner:
  """Compiled inference and train step of one model at one batch size."""

  def __init__(self, model, batch, num_classes):
    r = model.img_size
    rng = np.random.default_rng(0)
    self.images = jnp.asarray(rng.standard_normal((batch, r, r, 3), np.float32))
    self.labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
    self.variables = jax.jit(lambda k: model.init(k, self.images[:1], train=False))(
        jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3, weight_decay=0.05)
    self.opt_state = jax.jit(tx.init)(self.variables["params"])

    def infer(variables, images):
      return model.apply(variables, images, train=False)

    def train_step(variables, opt_state, images, labels, rng):
      def loss_fn(params):
        logits, state = model.apply({**variables, "params": params}, images, train=True,
                                    rngs={"drop_path": rng}, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, state
      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
      updates, opt_state = tx.update(grads, opt_state, variables["params"])
      params = optax.apply_updates(variables["params"], updates)
      return {"params": params, **state}, opt_state, loss

    self.infer = jax.jit(infer, compiler_options=ops.inference_compiler_options())
    self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
    self.rng = jax.random.PRNGKey(1)

  def compile(self, mode):
    t = time.perf_counter()
    if mode == "inference":
      compiled = self.infer.lower(self.variables, self.images).compile()
    else:
      compiled = self.train_step.lower(self.variables, self.opt_state, self.images,
                                       self.labels, self.rng).compile()
    return time.perf_counter() - t, _flops(compiled)

  def run(self, mode):
    if mode == "inference":
      self.infer(self.variables, self.images).block_until_ready()
    else:
      self.variables, self.opt_state, loss = self.train_step(
          self.variables, self.opt_state, self.images, self.labels, self.rng)
      loss.block_until_ready()


class TorchRunner:
  """The official PyTorch model (eval / AdamW train step) on the same inputs.

  It runs in its own process: in one process, XLA's and PyTorch's CPU thread pools slow
  each other down (the official model ran 2-7x slower beside JAX than alone here).
  Each `run` times one step there; the caller alternates it with ours.
  """

  def __init__(self, checkout, model, images, labels, threads, dtype, environ=None):
    import subprocess  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    self._dir = tempfile.mkdtemp(prefix="smlp_bench_")
    inputs = os.path.join(self._dir, "inputs.npz")
    np.savez(inputs, images=np.asarray(images).transpose(0, 3, 1, 2), labels=np.asarray(labels))
    arch = dict(img_size=model.img_size, embed_dim=model.embed_dim,
                layers=list(model.layers), num_classes=model.num_classes)
    cmd = [sys.executable, "-u", "-c", _TORCH_WORKER, os.path.abspath(checkout), inputs,
           json.dumps(arch), str(threads or 0), dtype]
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=environ)
    ready = self._proc.stdout.readline().strip()
    if ready != "ready":
      raise SystemExit(f"--torch_baseline {checkout}: the official model did not start "
                       f"({ready or 'see the error above'}); it needs torch and timm")

  def run(self, mode):
    self._proc.stdin.write(mode + "\n")
    self._proc.stdin.flush()
    return float(self._proc.stdout.readline())

  def close(self):
    import shutil  # pylint: disable=g-import-not-at-top
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
    shutil.rmtree(self._dir, ignore_errors=True)


_TORCH_WORKER = r"""
import json, sys, time
import numpy as np
import torch
checkout, inputs, arch, threads, dtype = sys.argv[1:6]
sys.path.insert(0, checkout)
try:
  from models.strip_mlp import StripMLPNet  # the official code, not this project's
except ImportError as e:
  print(f"cannot import models.strip_mlp: {e}"); sys.exit(1)
if int(threads):
  torch.set_num_threads(int(threads))
device = "cuda" if torch.cuda.is_available() else "cpu"
data = np.load(inputs)
images = torch.from_numpy(data["images"]).to(device)
labels = torch.from_numpy(data["labels"].astype(np.int64)).to(device)
net = StripMLPNet(**json.loads(arch)).to(device)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
amp = dtype == "bfloat16"
def step(mode):
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)
  if mode == "inference":
    net.eval()
    with torch.no_grad(), autocast:
      net(images)
  else:
    net.train()
    with autocast:
      loss = torch.nn.functional.cross_entropy(net(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  if device == "cuda":
    torch.cuda.synchronize()
print("ready")
for line in sys.stdin:
  t = time.perf_counter()
  step(line.strip())
  print(time.perf_counter() - t)
"""


def torch_environ(args):
  """The official model's environment: ours, or ours with --torch_malloc instead of --malloc."""
  if args.torch_malloc in (None, args.malloc):
    return None  # inherit ours: both sides run with the same --malloc
  return host_memory.environ_with(args.torch_malloc,
                                  host_memory.environ_without(args.malloc))


def benchmark(args):
  modes = args.modes.split(",")
  rows = []
  for variant in args.variants.split(","):
    overrides = dict(img_size=args.img_size, num_classes=args.num_classes, dtype=args.dtype,
                     depthwise_impl=args.depthwise_impl, patchify_impl=args.patchify_impl)
    if args.embed_dim:
      overrides["embed_dim"] = args.embed_dim
    if args.layers:
      overrides["layers"] = tuple(int(n) for n in args.layers.split(","))
    model = create_model(variant, **overrides)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      ours = JaxRunner(model, batch, args.num_classes)
      theirs = (TorchRunner(args.torch_baseline, model, ours.images, ours.labels,
                            args.torch_threads, args.dtype, torch_environ(args))
                if args.torch_baseline else None)
      for mode in modes:
        compile_s, flops = ours.compile(mode)
        ours.run(mode)  # warm-up
        if theirs:
          theirs.run(mode)
        ours_t, theirs_t = [], []
        for _ in range(args.repeats):  # alternate so that both see the same machine state
          ours_t.append(_seconds(lambda: ours.run(mode)))
          if theirs:
            time.sleep(args.pause)  # let the other side's idle threads stop spinning
            theirs_t.append(theirs.run(mode))
            time.sleep(args.pause)
        sec = statistics.median(ours_t)
        row = dict(variant=variant, batch=batch, mode=mode, dtype=args.dtype,
                   compile_s=round(compile_s, 2), images_per_s=round(batch / sec, 2),
                   step_ms=round(sec * 1e3, 1), peak_gib=_peak_memory(),
                   gflops_per_image=float(f"{flops / batch / 1e9:.4g}"),
                   achieved_tflops=float(f"{flops / sec / 1e12:.4g}"))
        if theirs:
          their_sec = statistics.median(theirs_t)
          row.update(torch_images_per_s=round(batch / their_sec, 2),
                     ratio=round(their_sec / sec, 2))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
      if theirs:
        theirs.close()
  return rows


def markdown(rows):
  cols = ["variant", "batch", "mode", "dtype", "images_per_s", "step_ms", "compile_s",
          "gflops_per_image", "achieved_tflops", "peak_gib"]
  if any("ratio" in r for r in rows):
    cols += ["torch_images_per_s", "ratio"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  dev = jax.devices()[0]
  header = (f"backend={jax.default_backend()} device={dev.device_kind} "
            f"devices={jax.device_count()} cpu={platform.processor() or platform.machine()} "
            f"cores={os.cpu_count()} jax={jax.__version__} "
            f"malloc={args.malloc} torch_malloc={args.torch_malloc or args.malloc} "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
            f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} "
            f"date={time.strftime('%Y-%m-%d')}")
  rows = benchmark(args)
  print(header)
  print(markdown(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"setup": header, "args": vars(args), "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  try:
    host_memory.reexec_with(parse_args().malloc)
  except ValueError as e:
    raise SystemExit(f"--malloc: {e}") from None
  main()
