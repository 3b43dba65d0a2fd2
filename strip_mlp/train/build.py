"""Everything a training run compiles, built once from the config: `build(config, info, mesh)`.

The train loop, the train-step benchmark and the tests all get the model, schedule,
optimizer, abstract train state and jitted steps from `build`, so they run exactly the
functions training runs. Nothing is allocated or compiled here: shapes come from
`jax.eval_shape`, and the jitted functions compile on first call (or `.lower().compile()`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax

from strip_mlp.train import optim, steps
from strip_mlp.models import registry
from strip_mlp.runtime import sharding
from strip_mlp.models.strip_mlp import StripMLP, create_model
from strip_mlp.train.plan import Plan, make_plan


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` returns.

  abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings (the target
    of a checkpoint restore). init(rng, pretrained=None) -> TrainState created directly in
    those shardings. train_step(state, batch) -> (state, metrics): state donated, batch
    split over all devices, metrics replicated. eval_step(variables, batch) -> sums.
  """

  plan: Plan
  model: Any
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable

  @property
  def state_shardings(self) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, self.abstract_state)


def build(
    config,
    info,
    mesh,
    *,
    model=None,
    schedule: optax.Schedule | None = None,
    mix_fn: Callable | None = None,
) -> Built:
  """Builds a run of `config` on dataset `info` (num_train, num_eval, num_classes) and
  `mesh`. `model` (any module with `img_size` and the StripMLP call signature),
  `schedule` (lr by update count, used as it is) and `mix_fn` (`steps.make_train_step`)
  replace the config's (tests of the step on small stand-ins, replayed mixup draws)."""
  plan = make_plan(config, info)
  if model is None:
    model = build_model(config, plan.num_classes, plan.image_size)
  schedule = schedule or build_schedule(config, plan)
  tx = build_optimizer(config, schedule)
  abstract, init = _state_and_init(
      config, model, tx, mesh, jax.random.key(int(config.seed)), plan.image_size
  )
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  repl = sharding.replicated(mesh)
  train_step = jax.jit(
      steps.make_train_step(model, tx, schedule, config, plan.num_classes, mesh, mix_fn),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, repl),
      donate_argnums=(0,),
  )
  eval_step = jax.jit(steps.make_eval_step(model), out_shardings=repl)
  return Built(plan, model, schedule, tx, abstract, init, train_step, eval_step)


def build_model(config, num_classes: int, image_size: int):
  """The model of `config.model` for this data: a Strip-MLP (a variant, or
  embed_dim/layers), or a variant of another family by `model.name`."""
  m = config.model
  if m.get("name"):
    family = registry.family_of_variant(m.name)
    kw = dict(num_classes=num_classes, drop_path_rate=m.drop_path_rate, dtype=m.dtype)
    if family.has_img_size():
      kw["img_size"] = image_size
    return family.create(m.name, **kw)
  kw = dict(
      num_classes=num_classes,
      img_size=image_size,
      drop_path_rate=m.drop_path_rate,
      dtype=m.dtype,
      depthwise_impl=m.depthwise_impl,
      patchify_impl=m.patchify_impl,
      remat=bool(m.get("remat", False)),
  )
  if m.embed_dim:
    kw["embed_dim"] = int(m.embed_dim)
  if m.layers:
    kw["layers"] = tuple(int(n) for n in m.layers)
  if m.variant:
    return create_model(m.variant, **kw)
  return StripMLP(**kw)


def build_schedule(config, plan: Plan) -> optax.Schedule:
  """lr of the update that follows `count` updates: the config's schedule under its
  `lr.timing` (optim.LR_TIMINGS)."""
  timing = config.lr.get("timing", "released")
  if config.lr.schedule == "constant":
    schedule = optim.constant_schedule(plan.base_lr, plan.warmup_lr, plan.warmup_steps)
  else:
    schedule = optim.warmup_cosine_schedule(
        plan.base_lr,
        plan.warmup_lr,
        plan.min_lr,
        plan.total_steps,
        plan.warmup_steps,
        warmup_prefix=config.lr.warmup_prefix,
        cooldown_steps=plan.cooldown_steps,
    )
  return optim.timed_schedule(schedule, timing, config.grad_accum_steps, plan.steps_per_epoch)


def build_optimizer(config, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  return optim.create_optimizer(
      schedule,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      grad_clip_norm=config.grad_clip_norm,
      mask=optim.WEIGHT_DECAY_MASKS[o.get("weight_decay_params", "matrices")],
  )


def _state_and_init(config, model, tx, mesh, rng, image_size: int) -> tuple[Any, Callable]:
  """(abstract state carrying its shardings, init). `init(rng, pretrained=None)` runs a
  jitted init whose outputs are created directly in their shardings (replicated, or split
  over 'fsdp'); `pretrained` is as in `steps.init_state`, as global arrays."""
  ema = config.ema_decay > 0
  init_state = functools.partial(steps.init_state, model, tx, ema=ema, image_size=image_size)
  abstract = jax.eval_shape(init_state, rng)
  shardings = sharding.tree_shardings(abstract, mesh)
  fresh = jax.jit(init_state, out_shardings=shardings)
  from_pretrained = jax.jit(lambda k, pre: init_state(k, pretrained=pre), out_shardings=shardings)

  def init(rng, pretrained=None):
    return fresh(rng) if pretrained is None else from_pretrained(rng, pretrained)

  return sharding.with_shardings(abstract, shardings), init
