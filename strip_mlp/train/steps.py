"""The train state and the pure step functions that jit compiles.

`train_step(state, batch) -> (state, metrics)` and `eval_step(variables, batch) -> sums`
are pure functions of arrays; `strip_mlp.train.build` jits them with their shardings. All
randomness of a step comes from fold_in(key(seed + 1), step), so a resumed run draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from strip_mlp.train import optim
from strip_mlp.runtime import sharding
from strip_mlp.train.mixup import mixup_cutmix


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data position is `step`).

  Not flax's TrainState: that one holds apply_fn and tx as static fields, which would put
  the model and the optimizer into the checkpoint target and every jit cache key; this one
  is arrays only (its state dict is what checkpoints store).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any  # {'params', 'batch_stats'} exponential moving average, {} when disabled

  def variables(self, use_ema: bool = False) -> dict:
    src = self.ema if use_ema else {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": src["params"], "batch_stats": src["batch_stats"]}


def init_state(
    model,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    ema: bool,
    pretrained: dict | None = None,
    image_size: int | None = None,
) -> TrainState:
  """A fresh TrainState (call under jit with out_shardings, or inside jax.eval_shape).

  pretrained: optional {'params', 'batch_stats'} trees of the model's structure whose leaves
  replace the random ones; None leaves (e.g. a re-initialised head) keep the random init.
  Under jit, XLA drops the random init of every replaced leaf. image_size: of the
  initialising input for models without an img_size (PoolFormer, any size works).
  """
  r = getattr(model, "img_size", None) or image_size
  variables = model.init({"params": rng}, jnp.zeros((1, r, r, 3), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if pretrained is not None:
    pick = lambda pre, fresh: fresh if pre is None else jnp.asarray(pre, fresh.dtype)
    is_none = lambda x: x is None
    params = jax.tree_util.tree_map(pick, pretrained["params"], params, is_leaf=is_none)
    batch_stats = jax.tree_util.tree_map(
        pick, pretrained["batch_stats"], batch_stats, is_leaf=is_none
    )
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema={"params": params, "batch_stats": batch_stats} if ema else {},
  )


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)) in float32 (timm's
  SoftTargetCrossEntropy); (B, C), (B, C) -> (B,)."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def all_finite(tree) -> jax.Array:
  """float32 1.0 when every leaf of `tree` is finite, else 0.0 (one pass over the leaves)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config,
    num_classes: int,
    mesh,
    mix_fn: Callable | None = None,
) -> Callable:
  """train_step(state, batch) -> (state, metrics); pure, to be jitted.

  batch: {'image' (B, R, R, 3), 'label' (B,) int, any other per-example (B, ...) arrays
  for `mix_fn`}. schedule: the lr of the update that follows `count` updates (the one
  `tx` uses). metrics: loss, grad_norm (before clipping), lr and params_finite (1.0 when
  every updated parameter is finite).

  The batch is processed as the released trainer processes its per-GPU batches:
  grad_accum_steps = k splits it into k interleaved micro-batches (example j goes to
  micro-batch j % k, each spread over all devices) whose gradients are averaged before
  one update, BatchNorm statistics carried from one to the next; group_size = g > 0 then
  splits each micro-batch into groups of g consecutive examples, each with its own
  BatchNorm batch statistics (ghost batch norm; the running statistics take the mean of
  the groups' updates) and its own mixup/cutmix draw with partners inside the group.
  mix_fn(rng, part) -> (images, soft targets) mixes one group (default: the config's
  mixup/cutmix and label smoothing).
  """
  accum = int(config.grad_accum_steps)
  ema_decay = float(config.ema_decay)
  base_key = jax.random.key(int(config.seed) + 1)
  micro_sharding = NamedSharding(mesh, P(None, sharding.DATA_AXES))
  mix_fn = mix_fn or config_mix_fn(config.data, num_classes)
  loss_fn = make_loss_fn(model, mix_fn, int(config.get("group_size") or 0))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(base_key, state.step)
    if accum == 1:
      (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    else:
      (loss, batch_stats), grads = accumulated_grads(
          grad_fn, state, batch, rng, accum, micro_sharding
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay > 0:
      ema = optim.ema_update(ema, {"params": params, "batch_stats": batch_stats}, ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
    )
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
        "params_finite": all_finite(params),
    }
    return new_state, metrics

  return train_step


def config_mix_fn(data, num_classes: int) -> Callable:
  """mix_fn(rng, part) -> (images, soft targets): the data config's mixup/cutmix draw and
  label smoothing for one group (`strip_mlp.train.mixup.mixup_cutmix`)."""
  return lambda rng, part: mixup_cutmix(
      rng,
      part["image"],
      part["label"],
      num_classes,
      mixup_alpha=data.mixup_alpha,
      cutmix_alpha=data.cutmix_alpha,
      switch_prob=data.mixup_switch_prob,
      label_smoothing=data.label_smoothing,
      mix_prob=data.mixup_prob,
  )


def make_loss_fn(model, mix_fn: Callable, group: int) -> Callable:
  """loss_fn(params, batch_stats, part, rng) -> (mean loss, new batch_stats) of a
  (micro-)batch `part` ({'image', 'label', ...}, (n, ...) each).

  group = g > 0 (and < n): n / g groups of g consecutive examples, the model vmapped over
  them (own BatchNorm batch statistics, own mix draw with rng fold_in(rng, i)); the loss
  and the running statistics are the groups' means. Otherwise one group: the whole part.
  """

  def group_loss(params, batch_stats, part, rng):
    mix_rng, drop_rng = jax.random.split(rng)
    images, targets = mix_fn(mix_rng, part)
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        rngs={"drop_path": drop_rng},
        mutable=["batch_stats"],
    )
    return jnp.mean(soft_cross_entropy(logits, targets)), updates.get("batch_stats", {})

  def loss_fn(params, batch_stats, part, rng):
    n = part["label"].shape[0]
    if not group or group >= n:
      return group_loss(params, batch_stats, part, rng)
    groups = jax.tree_util.tree_map(lambda x: x.reshape((n // group, group) + x.shape[1:]), part)
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n // group))
    losses, stats = jax.vmap(group_loss, in_axes=(None, None, 0, 0))(
        params, batch_stats, groups, rngs
    )
    return jnp.mean(losses), jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), stats)

  return loss_fn


def accumulated_grads(grad_fn, state: TrainState, batch: dict, rng, accum: int, micro_sharding):
  """((mean loss, batch_stats), mean grads) of `grad_fn` over `accum` micro-batches
  (micro-batch j = examples j, j+k, j+2k, ..., each spread over all devices, with rng
  fold_in(rng, j)), BatchNorm statistics carried from one micro-batch to the next."""

  def split(x):  # (B, ...) -> (k, B/k, ...)
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def micro(carry, xs):
    grads, loss, batch_stats = carry
    part, i = xs
    (l, batch_stats), g = grad_fn(state.params, batch_stats, part, jax.random.fold_in(rng, i))
    return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, batch_stats), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  (grads, loss, batch_stats), _ = jax.lax.scan(
      micro,
      (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
      (jax.tree_util.tree_map(split, batch), jnp.arange(accum)),
  )
  return (loss / accum, batch_stats), jax.tree_util.tree_map(lambda g: g / accum, grads)


def make_eval_step(model) -> Callable:
  """eval_step(variables, batch) -> sums of loss, top-1, top-5 hits and count (masked).

  batch: {'image' (B, R, R, 3), 'label' (B,), 'mask' (B,) 1.0 for real examples}; each sum
  is a float32 scalar, exact for hit counts below 2**24.
  """

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(top1 * mask),
        "top5": jnp.sum(top5 * mask),
        "count": jnp.sum(mask),
    }

  return eval_step
