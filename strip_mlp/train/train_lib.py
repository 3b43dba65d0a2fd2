"""The training loop: one code path for 1 CPU, 1 GPU, 8 GPUs or a TPU pod.

    from strip_mlp.train import train_lib
    result = train_lib.train_and_evaluate(config, workdir)

A ('data', 'fsdp') mesh over all devices of all processes; the train state created by a
jitted init straight into its shardings, or restored from the newest checkpoint in the
workdir; a jitted train step with the state donated and the global batch split over all
devices (BatchNorm statistics are global-batch statistics). Checkpoints hold the whole
state and the data position, so a rerun continues exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterator

import jax
import ml_collections

from strip_mlp.evaluation import evaluate
from strip_mlp.train import finetune
from strip_mlp.models import registry
from strip_mlp.runtime import sharding
from strip_mlp.checkpoints import train_checkpoint
from strip_mlp.train.build import Built, build
from strip_mlp.checkpoints.checkpoint_recovery import find_resume_point
from strip_mlp.errors import TrainingDivergedError
from strip_mlp.train.metric_writer import MetricWriter
from strip_mlp.models.strip_mlp import count_params
from strip_mlp.train.plan import read_dataset_info, validate_config
from strip_mlp.train.train_helpers import (
    PreemptionWatcher,
    Progress,
    Saver,
    divergence_message,
    fmt_duration,
    is_time,
    log,
    save_config,
)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh=None,
    train_iterator_fn: Callable | None = None,
    stop_at_step: int | None = None,
) -> dict:
  """Trains (resuming from the newest checkpoint in workdir), evaluates, checkpoints.

  Longer than 80 lines: set-up, then the loop, read top to bottom (big_vision's train.py).
  mesh: default all devices, ('data', 'fsdp') with fsdp = config.mesh.fsdp.
  train_iterator_fn: (config, global_batch, sharding, seed, start_step) -> iterator of
    global batches; default: the input pipeline's. stop_at_step: end this run there
    (saving a checkpoint, as on preemption); a later call resumes.
  Returns {'step', 'state', 'train_loss', 'eval'/'ema_eval' (when evaluated), 'best_top1',
  'preempted', 'stopped' (ended before the schedule's end), 'train_time_s', 'plan'}.
  Raises UserError subclasses (ConfigError, CheckpointMismatchError, TrainingDivergedError,
  DatasetNotFoundError, ...) with one line that says what to do.
  """
  t_start = time.time()
  # ---- mesh, data, everything compiled
  mesh = sharding.create_mesh(config.mesh.fsdp) if mesh is None else mesh
  validate_config(config, num_devices=mesh.devices.size)
  info = read_dataset_info(config.data)
  run = build(config, info, mesh)
  plan = run.plan
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  _log_setup(config, mesh, info, plan)

  # ---- state: the newest checkpoint, else init (+ optional pretrained weights)
  ckpt_dir = os.path.join(workdir, train_checkpoint.CHECKPOINT_DIR)
  state, best_top1 = _restore_or_init(config, run, ckpt_dir)  # before orbax opens the dir
  ckpt = train_checkpoint.Checkpointer(
      ckpt_dir,
      keep=config.keep_checkpoints,
      keep_best=config.keep_best,
      async_save=config.async_checkpointing,
  )
  meta = {
      "model": registry.model_config(run.model),
      "num_devices": int(mesh.devices.size),
      "num_processes": jax.process_count(),
  }
  start_step = int(jax.device_get(state.step))
  save_config(config, plan, workdir, dict(meta, mesh=dict(mesh.shape)))
  end_step = plan.total_steps if stop_at_step is None else min(plan.total_steps, stop_at_step)
  writer = MetricWriter(workdir, tensorboard=config.tensorboard, start_step=start_step)
  watcher = PreemptionWatcher()
  saver = Saver(ckpt, dict(meta, seed=int(config.seed)), plan.steps_per_epoch, ckpt.latest_step())
  result = {
      "plan": plan.to_dict(),
      "preempted": False,
      "stopped": False,
      "step": start_step,
      "train_loss": float("nan"),
  }
  try:
    if start_step >= end_step:
      log(f"nothing to train: the workdir is at step {start_step} (end: {end_step})")
      if start_step >= plan.total_steps:
        result.update(_evaluate(run, state, config, mesh, writer, start_step))
      return dict(result, best_top1=best_top1, train_time_s=time.time() - t_start, state=state)

    # ---- input and compilation
    train_iter = (train_iterator_fn or default_train_iterator)(
        config, config.batch_size, sharding.batch_sharding(mesh), int(config.seed), start_step
    )
    batch = next(train_iter)
    run = _compile(run, state, batch, config, mesh, start_step, end_step)
    progress = Progress(writer, config.batch_size, plan.total_steps, plan.steps_per_epoch)
    check_every = max(1, min(10, config.log_every_steps))

    # ---- loop
    for step in range(start_step + 1, end_step + 1):
      if step > start_step + 1:
        batch = next(train_iter)
      state, metrics = run.train_step(state, batch)
      progress.add(metrics)
      last = step == plan.total_steps
      preempted = watcher.should_stop(step, check_every)
      stopped = preempted or (step == end_step and not last)
      do_eval = is_time(step, plan.eval_every) or last
      do_save = is_time(step, plan.checkpoint_every) or last or stopped
      if is_time(step, config.log_every_steps) or step == end_step or do_eval or do_save:
        fault = progress.flush(step)  # never checkpoint or report a diverged state
        if fault:
          saver.announce_committed(wait=True)
          raise TrainingDivergedError(divergence_message(*fault, saver.last_saved_path()))
        saver.announce_committed()
      eval_metrics = None
      if do_eval:
        result.update(_evaluate(run, state, config, mesh, writer, step))
        eval_metrics = result["eval"]
        if eval_metrics["top1"] > best_top1:
          best_top1 = eval_metrics["top1"]
          do_save = do_save or config.keep_best
      if do_save:
        saver.save(
            step, state, float(best_top1), {"top1": eval_metrics["top1"]} if eval_metrics else None
        )
      if do_eval or do_save:
        progress.restart_clock()  # eval/save time is not train-step time
      result["step"] = step
      if stopped:
        saver.announce_committed(wait=True)
        log(
            f"{'preempted' if preempted else 'stopped'} at step {step}: checkpoint saved; "
            "rerun the same command to resume"
        )
        result.update(preempted=preempted, stopped=True)
        break
    saver.announce_committed(wait=True)
    result.update(
        train_loss=progress.last_loss,
        best_top1=best_top1,
        train_time_s=time.time() - t_start,
        state=state,
    )
    if not result["stopped"]:
      log(
          f"done: {result['step']} steps in {fmt_duration(time.time() - t_start)}, final "
          f"top1 {100 * result['eval']['top1']:.2f}%, best {100 * best_top1:.2f}%"
      )
    return result
  finally:
    watcher.close()
    writer.close()
    ckpt.close()


def default_train_iterator(
    config, batch_size: int, batch_sharding, seed: int, start_step: int
) -> Iterator[dict]:
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)

  return pipeline.create_train_iterator(
      config.data, batch_size, batch_sharding, seed, start_step=start_step
  )


def _log_setup(config, mesh, info, plan):
  log(
      f"devices: {mesh.devices.size} ({jax.devices()[0].platform}) in "
      f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; dataset {info.name}: "
      f"{info.num_train} train / {info.num_eval} eval images, {plan.num_classes} classes, "
      f"{plan.image_size}px"
  )
  log(
      f"plan: {plan.total_steps} steps of {config.batch_size} images "
      f"({plan.total_steps / plan.steps_per_epoch:.1f} epochs, {plan.steps_per_epoch:.1f} steps/"
      f"epoch), warmup {plan.warmup_steps}, lr {plan.base_lr:.3g} (x{plan.lr_factor:.3g} by "
      f"{config.lr.scaling}), eval every {_steps(plan.eval_every)}, checkpoint every "
      f"{_steps(plan.checkpoint_every)}"
  )


def _steps(every: float) -> str:
  """An interval in steps, to 0.1 step ('112.3', '500')."""
  return f"{every:.1f}".removesuffix(".0")


def _restore_or_init(config, run: Built, ckpt_dir: str):
  """(state, best eval top-1 so far) from the newest intact checkpoint in `ckpt_dir`
  (damaged newer ones are set aside with a one-line warning; none intact: one-line
  CheckpointDamagedError), else a fresh init (from config.init_from's weights if given)."""
  model_config = registry.model_config(run.model)
  point = find_resume_point(
      ckpt_dir,
      run.abstract_state,
      lambda where, meta, tree: train_checkpoint.check_fits(
          where, meta, tree, run.abstract_state, model_config
      ),
  )
  if point.warning:
    log(point.warning)
  if point.step is not None:
    log(f"resumed from {ckpt_dir}/{point.step} (step {int(point.meta['step'])})")
    return point.state, float(point.meta.get("best_top1", -1.0))
  t0 = time.time()
  pretrained = None
  if config.init_from:
    abstract = run.abstract_state
    pretrained, reinit = finetune.pretrained_onto(
        config.init_from,
        {"params": abstract.params, "batch_stats": abstract.batch_stats},
        img_size=run.plan.image_size if config.init_resize == "interpolate" else None,
    )
    log(
        f"initialising from {config.init_from}"
        + (f"; re-initialised {', '.join(reinit)}" if reinit else "")
    )
  state = run.init(jax.random.key(int(config.seed)), pretrained)
  log(f"initialised {count_params(state.params):,} parameters in {time.time() - t0:.1f}s")
  return state, -1.0


def _compile(run: Built, state, batch, config, mesh, start_step: int, end_step: int) -> Built:
  """`run` with its train step compiled, and its eval step when this run evaluates (or runs
  on several processes, which then wait for each other here)."""
  plan = run.plan
  t0 = time.time()
  compiled = {"train_step": run.train_step.lower(state, batch).compile()}
  will_eval = (
      end_step == plan.total_steps or end_step // plan.eval_every > start_step // plan.eval_every
  )
  if will_eval or jax.process_count() > 1:
    compiled["eval_step"] = run.eval_step.lower(
        state.variables(),
        evaluate.abstract_eval_batch(
            plan.eval_batch_size, config.data, sharding.batch_sharding(mesh)
        ),
    ).compile()
  log(f"compiled the train{' and eval' if will_eval else ''} steps in " f"{time.time() - t0:.1f}s")
  sharding.barrier(f"compiled_{start_step}")  # hosts may differ by minutes here
  return dataclasses.replace(run, **compiled)


def _evaluate(run: Built, state, config, mesh, writer: MetricWriter, step: int) -> dict:
  """{'eval': metrics[, 'ema_eval': metrics]} over the eval split, written and logged."""
  t0 = time.time()
  batch_sharding = sharding.batch_sharding(mesh)
  size = run.plan.eval_batch_size
  out = {
      "eval": evaluate.evaluate_split(
          run.eval_step, state.variables(), config.data, size, batch_sharding
      )
  }
  if config.ema_decay > 0:
    out["ema_eval"] = evaluate.evaluate_split(
        run.eval_step, state.variables(use_ema=True), config.data, size, batch_sharding
    )
  for kind, m in out.items():
    writer.write(step, kind, m)
    log(
        f"{kind} @ step {step}: top1 {100 * m['top1']:.2f}% top5 {100 * m['top5']:.2f}% "
        f"loss {m['loss']:.4f} ({int(m['count'])} images, {time.time() - t0:.1f}s)"
    )
  return out
