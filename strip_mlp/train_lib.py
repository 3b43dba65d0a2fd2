"""Training and evaluation of Strip-MLP on any number of devices and processes.

    from strip_mlp import train_lib
    train_lib.validate_config(config)                 # cheap; fails before any compile
    result = train_lib.train_and_evaluate(config, workdir)

One code path for 1 CPU, 1 GPU, 8 GPUs or a TPU pod: a ('data', 'fsdp') mesh over all
devices of all processes (`strip_mlp.sharding`), the train state created by a jitted init
straight into its sharding (shapes from `jax.eval_shape`), a jitted train step with the
state donated, the global batch split over all devices (BatchNorm statistics are therefore
global-batch statistics). Checkpoints (`strip_mlp.checkpointing`) hold the whole state and
the data position; the newest one in the workdir is resumed automatically.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from strip_mlp import checkpointing, optim, sharding
from strip_mlp.errors import UserError
from strip_mlp.mixup import mixup_cutmix
from strip_mlp.model import StripMLP, count_params, create_model
from strip_mlp.plan import ConfigError, Plan, make_plan, validate_config  # noqa: F401

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class TrainingDivergedError(UserError, FloatingPointError):
  """The loss, gradients or parameters became NaN/inf; nothing non-finite was saved."""


# ============================================================================ state

@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data position is `step`)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any  # {'params', 'batch_stats'} exponential moving average, {} when disabled

  def variables(self, use_ema: bool = False) -> dict:
    src = self.ema if use_ema else {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": src["params"], "batch_stats": src["batch_stats"]}


def build_model(config, num_classes: int, image_size: int) -> StripMLP:
  m = config.model
  kw = dict(num_classes=num_classes, img_size=image_size, drop_path_rate=m.drop_path_rate,
            dtype=m.dtype, depthwise_impl=m.depthwise_impl,
            patchify_impl=m.get("patchify_impl", "auto"))
  if m.embed_dim:
    kw["embed_dim"] = int(m.embed_dim)
  if m.layers:
    kw["layers"] = tuple(int(n) for n in m.layers)
  if m.variant:
    return create_model(m.variant, **kw)
  return StripMLP(**kw)


def build_schedule(config, plan: Plan) -> optax.Schedule:
  if config.lr.schedule == "constant":
    return optim.constant_schedule(plan.base_lr, plan.warmup_lr, plan.warmup_steps)
  return optim.warmup_cosine_schedule(plan.base_lr, plan.warmup_lr, plan.min_lr,
                                      plan.total_steps, plan.warmup_steps,
                                      warmup_prefix=config.lr.warmup_prefix)


def build_optimizer(config, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  return optim.create_optimizer(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                weight_decay=o.weight_decay, grad_clip_norm=config.grad_clip_norm)


# ============================================================================ steps

def init_state(model: StripMLP, tx: optax.GradientTransformation, rng: jax.Array,
               ema: bool, pretrained: dict | None = None) -> TrainState:
  """A fresh TrainState (call under jit with out_shardings, or inside jax.eval_shape).

  pretrained: optional {'params', 'batch_stats'} trees of the model's structure whose leaves
  replace the random ones; None leaves (e.g. a re-initialised head) keep the random init.
  Under jit, XLA drops the random init of every replaced leaf.
  """
  r = model.img_size
  variables = model.init({"params": rng}, jnp.zeros((1, r, r, 3), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if pretrained is not None:
    pick = lambda pre, fresh: fresh if pre is None else jnp.asarray(pre, fresh.dtype)
    is_none = lambda x: x is None
    params = jax.tree_util.tree_map(pick, pretrained["params"], params, is_leaf=is_none)
    batch_stats = jax.tree_util.tree_map(pick, pretrained["batch_stats"], batch_stats,
                                         is_leaf=is_none)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema={"params": params, "batch_stats": batch_stats} if ema else {})


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)) (timm SoftTargetCrossEntropy)."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def make_train_step(model: StripMLP, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config, num_classes: int, mesh) -> Callable:
  """train_step(state, batch) -> (state, metrics); pure, to be jitted.

  Randomness (mixup/cutmix, drop path) comes from fold_in(PRNGKey(seed), step), so a resumed
  run draws exactly what an uninterrupted one would. With grad_accum_steps = k the global
  batch is processed as k interleaved micro-batches (each spread over all devices) whose
  gradients are averaged before one optimizer update.
  """
  d = config.data
  accum = int(config.grad_accum_steps)
  ema_decay = float(config.ema_decay)
  base_key = jax.random.key(int(config.seed) + 1)
  micro_sharding = NamedSharding(mesh, P(None, sharding.DATA_AXES))

  def loss_fn(params, batch_stats, images, targets, rng):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, rngs={"drop_path": rng}, mutable=["batch_stats"])
    return jnp.mean(soft_cross_entropy(logits, targets)), updates.get("batch_stats", {})

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(base_key, state.step)
    mix_rng, drop_rng = jax.random.split(rng)
    images, targets = mixup_cutmix(
        mix_rng, batch["image"], batch["label"], num_classes, mixup_alpha=d.mixup_alpha,
        cutmix_alpha=d.cutmix_alpha, switch_prob=d.mixup_switch_prob,
        label_smoothing=d.label_smoothing, mix_prob=d.mixup_prob)
    if accum == 1:
      (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, images, targets,
                                           drop_rng)
    else:
      def split(x):  # (B, ...) -> (k, B/k, ...): micro-batch j = examples j, j+k, j+2k, ...
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

      def micro(carry, xs):
        grads, loss, batch_stats = carry
        imgs, tgts, i = xs
        (l, batch_stats), g = grad_fn(state.params, batch_stats, imgs, tgts,
                                      jax.random.fold_in(drop_rng, i))
        return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, batch_stats), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      (grads, loss, batch_stats), _ = jax.lax.scan(
          micro, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
          (split(images), split(targets), jnp.arange(accum)))
      grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
      loss = loss / accum
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay > 0:
      ema = optim.ema_update(ema, {"params": params, "batch_stats": batch_stats}, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema=ema)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "params_finite": all_finite(params)}
    return new_state, metrics

  return train_step


def all_finite(tree) -> jax.Array:
  """float32 1.0 when every leaf of `tree` is finite, else 0.0 (one pass over the leaves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32)


def first_nonfinite(step_metrics: list[dict], first_step: int):
  """(step, [what is not finite], that step's metrics) of the first step of `step_metrics`
  (host values, step `first_step` onwards) with a non-finite loss, gradient norm or
  parameter; None when all are finite."""
  for i, m in enumerate(step_metrics):
    bad = [name for name, ok in (("loss", np.isfinite(m["loss"])),
                                 ("gradients", np.isfinite(m["grad_norm"])),
                                 ("parameters", m["params_finite"] > 0)) if not ok]
    if bad:
      return first_step + i, bad, m
  return None


def divergence_message(step: int, bad: list[str], metrics: dict, last_good: str | None) -> str:
  """One line: what became non-finite at `step`, the likely cause, and where to resume."""
  if "loss" in bad:
    cause = (f"the loss is {metrics['loss']}: training diverged (lower lr.base or raise the "
             "warmup) or the data holds non-finite values")
  else:
    cause = (f"the loss was still finite ({metrics['loss']:.4g}), so this is a numerical "
             "fault in the backward pass or the update, not a learning-rate problem; please "
             "report it with the workdir's config.json")
  resume = (f"the last checkpoint, {last_good}, is finite and a rerun resumes from it"
            if last_good else "no checkpoint was saved, so a rerun starts from scratch")
  return (f"at step {step} the {' and '.join(bad)} became non-finite; {cause}. Stopped "
          f"without saving ({resume}).")


def jit_train_step(model: StripMLP, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, config, num_classes: int, mesh,
                   state_shardings) -> Callable:
  """The jitted train step: state donated and kept in `state_shardings`, batch split over
  all devices of `mesh`, metrics replicated."""
  return jax.jit(make_train_step(model, tx, schedule, config, num_classes, mesh),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def make_eval_step(model: StripMLP) -> Callable:
  """eval_step(variables, batch) -> sums of loss, top-1, top-5 hits and count (masked)."""
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}
  return eval_step


# ============================================================================ host helpers

def is_main_process() -> bool:
  return jax.process_index() == 0


def log(msg: str):
  """stdout from process 0 only."""
  if is_main_process():
    print(msg, flush=True)


class MetricWriter:
  """metrics.jsonl (one JSON object per line) and optional TensorBoard, process 0 only.

  Rows of steps after `start_step` (written by an earlier run after the checkpoint that
  this run resumes from) are dropped when the file is opened, so every step appears once
  and the file plots as one run.
  """

  def __init__(self, workdir: str, tensorboard: bool = False, start_step: int = 0):
    self.enabled = is_main_process()
    self._tb = None
    if not self.enabled:
      return
    path = os.path.join(workdir, METRICS_FILE)
    _truncate_metrics(path, start_step)
    self._file = open(path, "a")
    if tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self._file.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      # tf.summary.write with the scalars plugin's metadata: what tf.summary.scalar writes,
      # without needing the tensorboard package installed.
      meta = tf.compat.v1.SummaryMetadata(
          plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
      with self._tb.as_default():
        for k, v in values.items():
          tf.summary.write(f"{kind}/{k}", tf.constant(v, tf.float32), step=int(step),
                           metadata=meta)
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _truncate_metrics(path: str, last_step: int):
  """Drops the rows of `path` (metrics.jsonl) whose step is after `last_step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
  if len(keep) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  log(f"metrics: dropped {len(lines) - len(keep)} row(s) after step {last_step} from {path} "
      "(logged after the checkpoint this run resumes from)")


class PreemptionWatcher:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop polls (save, then stop); all
  processes agree before acting. A second signal goes to the previous handler (Ctrl-C
  twice: KeyboardInterrupt at once)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._flag = False
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._old[s] = signal.signal(s, self._handler)

  def _handler(self, signum, frame):
    previous = self._old.get(signum)
    if self._flag and callable(previous):
      previous(signum, frame)
      return
    self._flag = True
    print(f"process {jax.process_index()}: received signal {signum}; saving a checkpoint "
          "and stopping at the end of this step", flush=True)

  def should_stop(self, step: int, every: int) -> bool:
    """Collective in multi-process runs: called by every process at the same steps."""
    if jax.process_count() == 1:
      return self._flag
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.array([self._flag], np.int32))
    return bool(np.any(flags))

  def close(self):
    for s, h in self._old.items():
      signal.signal(s, h)


def announce_saved(ckpt: checkpointing.Checkpointer, steps: list[int]):
  """Logs the checkpoints that orbax has committed (async saves finish after `save`)."""
  for step in steps:
    log(f"saved checkpoint {ckpt.directory}/{step}")


def _fmt_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def save_config(config, plan: Plan, workdir: str, extra: dict):
  """Writes the resolved config (overrides applied, derived values included) to workdir."""
  if not is_main_process():
    return
  resolved = json.loads(config.to_json_best_effort())
  resolved["model"]["num_classes"] = plan.num_classes
  resolved["model"]["img_size"] = plan.image_size
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("config", {})
    new_flat = flax.traverse_util.flatten_dict(resolved, sep=".")
    old_flat = flax.traverse_util.flatten_dict(old, sep=".")
    changed = sorted(k for k in new_flat.keys() | old_flat.keys()
                     if new_flat.get(k) != old_flat.get(k))
    if changed:
      log(f"note: config differs from the one in {path}: {', '.join(changed[:8])}")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"config": resolved, "derived": {**plan.to_dict(), **extra}}, f, indent=2)
  os.replace(tmp, path)


def default_train_iterator(config, batch_size: int, batch_sharding, seed: int,
                           start_step: int) -> Iterator[dict]:
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.create_train_iterator(config.data, batch_size, batch_sharding, seed,
                                        start_step=start_step)


# ============================================================================ training

def create_train_state(config, model, tx, mesh, rng) -> tuple[TrainState, Callable]:
  """(abstract state carrying its shardings, init).

  Nothing is allocated here: shapes come from jax.eval_shape. `init(rng, pretrained=None)`
  runs a jitted init whose outputs are created directly in their shardings (replicated, or
  split over 'fsdp'); `pretrained` is as in `init_state`, as global arrays.
  """
  ema = config.ema_decay > 0
  abstract = jax.eval_shape(lambda k: init_state(model, tx, k, ema), rng)
  shardings = sharding.tree_shardings(abstract, mesh)
  fresh = jax.jit(lambda k: init_state(model, tx, k, ema), out_shardings=shardings)
  from_pretrained = jax.jit(lambda k, pre: init_state(model, tx, k, ema, pre),
                            out_shardings=shardings)

  def init(rng, pretrained=None):
    return fresh(rng) if pretrained is None else from_pretrained(rng, pretrained)
  return sharding.with_shardings(abstract, shardings), init


def load_pretrained_variables(path: str, target: TrainState) -> tuple[dict, list[str]]:
  """Pretrained {'params', 'batch_stats'} for `init(rng, pretrained)`: global arrays in the
  target's shardings, None for the leaves to re-initialise (the head when the class count
  differs). Raises CheckpointMismatchError for any other difference."""
  _, pretrained = checkpointing.load_pretrained(path)
  abstract = {"params": target.params, "batch_stats": target.batch_stats}
  merged, reinit = checkpointing.merge_pretrained(abstract, pretrained, source=path)
  flat = flax.traverse_util.flatten_dict(merged, sep="/")
  for k in reinit:
    flat[k] = None
  merged = flax.traverse_util.unflatten_dict(flat, sep="/")
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  placed = jax.tree_util.tree_map(
      lambda x, s: None if x is None else sharding.put_global(x, s), merged, shardings,
      is_leaf=lambda x: x is None)
  return placed, reinit


def abstract_eval_batch(batch_size: int, data_cfg, batch_sharding) -> dict:
  """ShapeDtypeStructs of an eval batch {'image' (B, R, R, 3), 'label' (B,), 'mask' (B,)}."""
  b, r = batch_size, int(data_cfg.image_size)
  dtype = jnp.bfloat16 if data_cfg.image_dtype == "bfloat16" else jnp.float32
  return {"image": jax.ShapeDtypeStruct((b, r, r, 3), dtype, sharding=batch_sharding),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding),
          "mask": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=batch_sharding)}


def evaluate(eval_step, variables, config, plan: Plan, batch_sharding) -> dict:
  """top1/top5 (fractions), mean loss and count over the whole eval split.

  Sums are accumulated exactly on the host (the same code as eval.py).
  """
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top
  from strip_mlp.evaluate import evaluate_batches  # pylint: disable=g-import-not-at-top
  batches = pipeline.create_eval_iterator(config.data, plan.eval_batch_size,
                                          batch_sharding)
  result = evaluate_batches(eval_step, variables, batches)
  return {k: result[k] for k in ("top1", "top5", "loss", "count")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh=None, train_iterator_fn: Callable | None = None,
                       stop_at_step: int | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in workdir), evaluates, checkpoints.

  Args:
    config: a config from configs/*.py (see configs/common.py for the keys).
    workdir: checkpoints, config.json and metrics.jsonl go here.
    mesh: default: all devices, ('data', 'fsdp') with fsdp = config.mesh.fsdp.
    train_iterator_fn: (config, global_batch, sharding, seed, start_step) -> iterator of
      global batches; default: strip_mlp.data.pipeline.create_train_iterator.
    stop_at_step: end this run at this step (saving a checkpoint, as on preemption) even
      if the schedule is longer; a later call resumes (time-sliced jobs, tests).
  Returns:
    {'step', 'state' (the final TrainState), 'train_loss', 'eval' / 'ema_eval' (when
     evaluated), 'best_top1', 'preempted', 'stopped' (True when ended before the schedule's
     end), 'train_time_s', 'plan'}.
  Raises:
    ConfigError, checkpointing.CheckpointMismatchError, TrainingDivergedError,
    strip_mlp.data.sources.DatasetNotFoundError -- each with one line that says what to do.
  """
  t_start = time.time()
  mesh = sharding.create_mesh(config.mesh.fsdp) if mesh is None else mesh
  n_dev = mesh.devices.size
  validate_config(config, num_devices=n_dev)
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top
  info = pipeline.get_dataset_info(config.data)
  plan = make_plan(config, info)
  model = build_model(config, plan.num_classes, plan.image_size)
  schedule = build_schedule(config, plan)
  tx = build_optimizer(config, schedule)
  batch_sharding = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  if is_main_process():
    os.makedirs(workdir, exist_ok=True)
  log(f"devices: {n_dev} ({jax.devices()[0].platform}) in {jax.process_count()} process(es), "
      f"mesh {dict(mesh.shape)}; dataset {info.name}: {info.num_train} train / "
      f"{info.num_eval} eval images, {plan.num_classes} classes, {plan.image_size}px")
  log(f"plan: {plan.total_steps} steps of {config.batch_size} images "
      f"({plan.total_steps / plan.steps_per_epoch:.1f} epochs, {plan.steps_per_epoch:.1f} steps/"
      f"epoch), warmup {plan.warmup_steps}, lr {plan.base_lr:.3g} (x{plan.lr_factor:.3g} by "
      f"{config.lr.scaling}), eval every {plan.eval_every}, checkpoint every "
      f"{plan.checkpoint_every}")

  # ---- state: restore the newest checkpoint, else init (+ optional pretrained weights)
  rng = jax.random.key(int(config.seed))
  target, init_fn = create_train_state(config, model, tx, mesh, rng)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                    keep=config.keep_checkpoints, keep_best=config.keep_best,
                                    async_save=config.async_checkpointing)
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, target)
  model_config = model.config_dict()
  latest = ckpt.latest_step()
  best_top1 = -1.0
  if latest is not None:
    ckpt.check_compatible(latest, target, model_config)
    state, meta = ckpt.restore(latest, target)
    best_top1 = float(meta.get("best_top1", -1.0))
    log(f"resumed from {ckpt.directory}/{latest} (step {int(meta['step'])})")
  else:
    t0 = time.time()
    pretrained = None
    if config.init_from:
      pretrained, reinit = load_pretrained_variables(config.init_from, target)
      log(f"initialising from {config.init_from}"
          + (f"; re-initialised {', '.join(reinit)}" if reinit else ""))
    state = init_fn(rng, pretrained)
    del pretrained
    log(f"initialised {count_params(state.params):,} parameters in {time.time() - t0:.1f}s")
  start_step = int(jax.device_get(state.step))
  save_config(config, plan, workdir, {"num_devices": n_dev,
                                      "num_processes": jax.process_count(),
                                      "mesh": dict(mesh.shape), "model": model_config})

  # ---- compiled functions
  step_fn = jit_train_step(model, tx, schedule, config, plan.num_classes, mesh,
                           state_shardings)
  eval_fn = jax.jit(make_eval_step(model), out_shardings=repl)

  writer = MetricWriter(workdir, tensorboard=config.tensorboard, start_step=start_step)
  watcher = PreemptionWatcher()
  result = {"plan": plan.to_dict(), "preempted": False, "stopped": False}
  end_step = plan.total_steps if stop_at_step is None else min(plan.total_steps, stop_at_step)
  meta_base = {"model": model_config, "num_devices": n_dev,
               "num_processes": jax.process_count(), "seed": int(config.seed)}
  last_saved = latest

  def do_save(step, metrics=None):
    nonlocal last_saved
    meta = dict(meta_base, epoch=float(step / plan.steps_per_epoch), best_top1=float(best_top1))
    if ckpt.save(step, state, meta, metrics):
      last_saved = step
      log(f"saving checkpoint {ckpt.directory}/{step}")

  def run_eval(step) -> dict:
    t0 = time.time()
    out = {"eval": evaluate(eval_fn, state.variables(), config, plan, batch_sharding)}
    if config.ema_decay > 0:
      out["ema_eval"] = evaluate(eval_fn, state.variables(use_ema=True), config, plan,
                                 batch_sharding)
    for kind, m in out.items():
      writer.write(step, kind, m)
      log(f"{kind} @ step {step}: top1 {100 * m['top1']:.2f}% top5 {100 * m['top5']:.2f}% "
          f"loss {m['loss']:.4f} ({int(m['count'])} images, {time.time() - t0:.1f}s)")
    return out

  try:
    if start_step >= end_step:
      log(f"nothing to train: the workdir is at step {start_step} (end: {end_step})")
      if start_step >= plan.total_steps:
        result.update(run_eval(start_step))
      result.update(step=start_step, best_top1=best_top1, train_time_s=time.time() - t_start,
                    state=state)
      return result

    train_iter = (train_iterator_fn or default_train_iterator)(
        config, config.batch_size, batch_sharding, int(config.seed), start_step)
    batch = next(train_iter)
    t0 = time.time()
    compiled = step_fn.lower(state, batch).compile()
    will_eval = (end_step == plan.total_steps
                 or end_step // plan.eval_every > start_step // plan.eval_every)
    if will_eval or jax.process_count() > 1:  # compile it now: all hosts sync just below
      eval_fn = eval_fn.lower(state.variables(), abstract_eval_batch(
          plan.eval_batch_size, config.data, batch_sharding)).compile()
    log(f"compiled the train{' and eval' if will_eval else ''} steps in "
        f"{time.time() - t0:.1f}s")
    sharding.barrier(f"compiled_{start_step}")  # hosts may differ by minutes here

    pending, last_loss = [], float("nan")
    t_log, steps_since_log, step_times = time.time(), 0, []
    check_every = max(1, min(10, config.log_every_steps))

    def flush(step):
      """Fetches pending step metrics, raises on NaN/inf, logs the mean."""
      nonlocal pending, t_log, steps_since_log, last_loss
      if not pending:
        return
      vals = jax.device_get(pending)
      fault = first_nonfinite(vals, step - len(vals) + 1)
      if fault:
        announce_saved(ckpt, ckpt.wait())
        raise TrainingDivergedError(divergence_message(
            *fault, f"{ckpt.directory}/{last_saved}" if last_saved is not None else None))
      for v in vals:
        v.pop("params_finite")
      dt = time.time() - t_log
      step_time = dt / max(steps_since_log, 1)
      step_times.append(step_time)
      mean = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
      mean["lr"] = float(vals[-1]["lr"])
      mean.update(images_per_sec=config.batch_size / step_time, step_time=step_time,
                  epoch=step / plan.steps_per_epoch)
      last_loss = mean["loss"]
      writer.write(step, "train", mean)
      eta = float(np.median(step_times[-20:])) * (plan.total_steps - step)
      width = len(str(plan.total_steps))
      log(f"step {step:>{width}}/{plan.total_steps} ({100 * step / plan.total_steps:3.0f}%) | "
          f"loss {mean['loss']:.4f} | lr {mean['lr']:.3e} | gnorm {mean['grad_norm']:.3f} | "
          f"{mean['images_per_sec']:.1f} img/s | {step_time:.3f} s/step | "
          f"ETA {_fmt_duration(eta)}")
      pending, t_log, steps_since_log = [], time.time(), 0
      announce_saved(ckpt, ckpt.newly_committed())

    step = start_step
    while step < end_step:
      if step > start_step:
        batch = next(train_iter)
      state, metrics = compiled(state, batch)
      pending.append(metrics)
      step += 1
      steps_since_log += 1
      last = step == plan.total_steps
      if step % config.log_every_steps == 0 or step == end_step:
        flush(step)
      preempted = watcher.should_stop(step, check_every)
      stopped = preempted or (step == end_step and not last)
      is_eval = step % plan.eval_every == 0 or last
      is_ckpt = step % plan.checkpoint_every == 0 or last or stopped
      eval_metrics = None
      if is_eval or is_ckpt:
        flush(step)  # never checkpoint or report a diverged state
      if is_eval:
        out = run_eval(step)
        result.update(out)
        eval_metrics = out["eval"]
        if eval_metrics["top1"] > best_top1:
          best_top1 = eval_metrics["top1"]
          is_ckpt = is_ckpt or config.keep_best
      if is_ckpt:
        do_save(step, {"top1": eval_metrics["top1"]} if eval_metrics else None)
      if is_eval or is_ckpt:
        t_log = time.time()  # eval/save time is not train-step time
      if stopped:
        announce_saved(ckpt, ckpt.wait())
        log(f"{'preempted' if preempted else 'stopped'} at step {step}: checkpoint saved; "
            "rerun the same command to resume")
        result.update(preempted=preempted, stopped=True)
        break
    announce_saved(ckpt, ckpt.wait())
    result.update(step=step, train_loss=last_loss, best_top1=best_top1,
                  train_time_s=time.time() - t_start, state=state)
    if not result["stopped"]:
      log(f"done: {step} steps in {_fmt_duration(time.time() - t_start)}, final top1 "
          f"{100 * result['eval']['top1']:.2f}%, best {100 * best_top1:.2f}%")
    return result
  finally:
    watcher.close()
    writer.close()
    ckpt.close()
