"""Optimizer of the published Strip-MLP recipe: AdamW, weight-decay mask, lr rule and schedule.

Facts reproduced (the released Swin-style PyTorch trainer of the official code):
* AdamW(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05); parameters with one dimension and
  every bias get no weight decay, everything else decays (position tables, GRN gamma/beta).
* lr schedule stepped per optimizer update (timm `CosineLRScheduler`, `t_in_epochs=False`):
  linear warmup from `warmup_lr` to `base_lr` over the warmup steps, and
  `min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total)) / 2` afterwards, where timm's
  default (`warmup_prefix=False`) measures `t` from step 0, not from the end of the warmup.
* the global-norm gradient clip (5.0) runs before AdamW.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

LR_SCALING_RULES = "'none', 'linear_<N>' (lr * batch / N) or 'sqrt_<N>' (lr * sqrt(batch / N))"
_RULE = re.compile(r"^(none|linear_(\d+)|sqrt_(\d+))$")


def lr_scale_factor(rule: str, global_batch_size: int) -> float:
  """Multiplier of base/warmup/min lr for `global_batch_size` (effective, per update).

  'linear_300' is the released script's rule (lr * total_batch / 300), 'linear_512' Swin's,
  'none' keeps the configured values.
  """
  m = _RULE.match(rule or "")
  if not m:
    raise ValueError(f"lr.scaling={rule!r} is not a known rule; use {LR_SCALING_RULES}")
  if m.group(1) == "none":
    return 1.0
  if m.group(2):
    return global_batch_size / int(m.group(2))
  return math.sqrt(global_batch_size / int(m.group(3)))


def warmup_cosine_schedule(
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_prefix: bool = False,
    cooldown_steps: int = 0,
) -> optax.Schedule:
  """lr(step) of timm's CosineLRScheduler stepped per update (one cycle).

  warmup_prefix=False (the released default): cosine over [0, total_steps - cooldown_steps)
  with the first `warmup_steps` replaced by the linear ramp; True: cosine over the steps
  after warmup. The last `cooldown_steps` stay at `min_lr` (timm's cooldown epochs).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not (
      0 <= warmup_steps and 0 <= cooldown_steps and warmup_steps + cooldown_steps < total_steps
  ):
    raise ValueError(
        f"warmup + cooldown ({warmup_steps} + {cooldown_steps} steps) must be shorter than "
        f"training ({total_steps} steps)"
    )

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    ramp = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_steps, 1)
    if warmup_prefix:
      t_cos, t_total = t - warmup_steps, total_steps - cooldown_steps - warmup_steps
    else:
      t_cos, t_total = t, total_steps - cooldown_steps
    # (1 + cos(pi * f)) / 2 = sin(pi / 2 * (1 - f))^2, with 1 - f from the exact remaining
    # steps: float32 keeps ~1e-7 relative error near the end, where cos(pi * f) ~ -1 would
    # cancel to ~1e-6.
    rest = jnp.clip((t_total - t_cos) / t_total, 0.0, 1.0)
    cosine = min_lr + (base_lr - min_lr) * jnp.square(jnp.sin(0.5 * jnp.pi * rest))
    return jnp.where(t < warmup_steps, ramp, cosine)

  return schedule


LR_TIMINGS = {
    # The schedule's argument for the update that follows `t` updates, with k micro-batches
    # per update and `spe` updates per epoch.
    # 'released': max(t - 1/k, 0). The released train_one_epoch calls
    # lr_scheduler.step_update(epoch * num_steps + idx) after optimizer.step(), counting
    # micro-batches, and the first update runs at the warmup lr the scheduler starts at.
    "released": lambda t, k, spe: jnp.maximum(t - 1.0 / k, 0.0),
    # 'current': t (timm's train.py with a per-update scheduler; optax's count).
    "current": lambda t, k, spe: t,
    # 'epoch': the start of t's epoch, a staircase (timm's schedulers with t_in_epochs=True,
    # stepped once per epoch: every update of epoch e at lr(e)).
    "epoch": lambda t, k, spe: jnp.floor(t / spe) * spe,
}


def timed_schedule(
    schedule: optax.Schedule, timing: str, accum: int = 1, steps_per_epoch: float = 1.0
) -> optax.Schedule:
  """lr of the update that follows `count` updates, under `timing` (see LR_TIMINGS)."""
  if timing == "current":
    return schedule
  at = LR_TIMINGS[timing]
  return lambda count: schedule(at(jnp.asarray(count, jnp.float32), accum, steps_per_epoch))


def constant_schedule(base_lr: float, warmup_lr: float, warmup_steps: int) -> optax.Schedule:
  """Linear warmup, then constant `base_lr` (for quick experiments)."""

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    ramp = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_steps, 1)
    return jnp.where(t < warmup_steps, ramp, base_lr)

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for leaves that decay: every leaf except 1-D (or scalar) ones and those named 'bias'.

  Matches the released `set_weight_decay` (`len(shape) == 1 or name.endswith('.bias')`):
  the strip layers' biases are stored 2-D here (L, G) but are named 'bias', the GRN
  gamma/beta (1, 1, 1, C) and the position tables (2L+1, D) decay as in PyTorch.
  """

  def decays(path, leaf):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return bool(jnp.ndim(leaf) > 1 and name != "bias")

  return jax.tree_util.tree_map_with_path(decays, params)


def decay_all(params: Any) -> Any:
  """True for every leaf: weight decay on all parameters (RaftMLP's trainer)."""
  return jax.tree_util.tree_map(lambda _: True, params)


WEIGHT_DECAY_MASKS = {"matrices": weight_decay_mask, "all": decay_all}


def create_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.05,
    grad_clip_norm: float = 5.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip_norm) -> AdamW(schedule) with decoupled decay on `mask`.

  optax's adamw is PyTorch's AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p).
  `mask` is a pytree of bools or a callable params -> mask (default `weight_decay_mask`).
  """
  parts = []
  if grad_clip_norm and grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=b1,
          b2=b2,
          eps=eps,
          weight_decay=weight_decay,
          mask=weight_decay_mask if mask is None else mask,
      )
  )
  return optax.chain(*parts)


def ema_update(ema: Any, new: Any, decay: float | jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * new, leaf-wise (params and BatchNorm statistics)."""
  return jax.tree_util.tree_map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)
