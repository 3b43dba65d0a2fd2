"""Validates a training config and derives the run's plan (steps, lr, intervals).

`validate_config` checks what is known without reading data or compiling; `make_plan`
resolves epochs to steps and the lr scaling rule once the dataset's sizes are known.
Both raise `ConfigError` with one line that says what to change.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import ml_collections

from strip_mlp import optim
from strip_mlp.errors import UserError
from strip_mlp.model import VARIANTS

class ConfigError(UserError, ValueError):
  """A config key has a value that cannot work; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Durations and sizes derived from the config and the dataset."""
  num_classes: int
  image_size: int
  num_train: int
  num_eval: int
  steps_per_epoch: float
  total_steps: int
  warmup_steps: int
  eval_every: int
  checkpoint_every: int
  base_lr: float
  warmup_lr: float
  min_lr: float
  lr_factor: float
  eval_batch_size: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_SCHEDULES = ("cosine", "constant")
_DTYPES = ("float32", "bfloat16", "float16")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    num_processes: int | None = None) -> None:
  """Raises ConfigError with one clear line when a value cannot work.

  Checks only what is known without reading data or compiling (unknown keys are refused
  earlier, by the locked ConfigDict / config_flags).
  """
  n_dev = jax.device_count() if num_devices is None else num_devices
  n_proc = jax.process_count() if num_processes is None else num_processes
  c = config
  errs = []

  def need(ok, msg):
    if not ok:
      errs.append(msg)

  m = c.model
  need(m.variant in VARIANTS or (not m.variant and m.embed_dim and m.layers),
       f"model.variant={m.variant!r} must be one of {sorted(VARIANTS)} (or '' with "
       "model.embed_dim and model.layers set)")
  if m.layers is not None:
    need(len(m.layers) == 4 and all(int(n) >= 0 for n in m.layers),
         f"model.layers={tuple(m.layers)} must be 4 block counts, e.g. '(2,2,6,2)'")
  need(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate={m.drop_path_rate} must be in [0, 1)")
  need(m.dtype in _DTYPES, f"model.dtype={m.dtype!r} must be one of {_DTYPES}")
  img = m.img_size or c.data.image_size
  need(img and img % 32 == 0, f"image size {img} (model.img_size / data.image_size) must be a "
       "positive multiple of 32")
  need(m.img_size is None or m.img_size == c.data.image_size,
       f"model.img_size={m.img_size} differs from data.image_size={c.data.image_size}; set "
       "data.image_size (the model follows it)")
  need(m.num_classes is None or m.num_classes > 0,
       f"model.num_classes={m.num_classes} must be positive (or None: from the dataset)")

  need(c.batch_size > 0 and c.batch_size % n_dev == 0,
       f"batch_size={c.batch_size} must be a positive multiple of the device count ({n_dev})")
  need(c.batch_size % n_proc == 0,
       f"batch_size={c.batch_size} must be a multiple of the process count ({n_proc})")
  need(c.grad_accum_steps >= 1 and c.batch_size % (c.grad_accum_steps * n_dev) == 0,
       f"grad_accum_steps={c.grad_accum_steps} must be >= 1 and split batch_size="
       f"{c.batch_size} into micro-batches that are multiples of the device count ({n_dev})")
  eb = c.eval_batch_size or c.batch_size
  need(eb > 0 and eb % n_dev == 0,
       f"eval_batch_size={eb} must be a positive multiple of the device count ({n_dev})")
  need(c.mesh.fsdp >= 1 and n_dev % c.mesh.fsdp == 0,
       f"mesh.fsdp={c.mesh.fsdp} must be >= 1 and divide the device count ({n_dev})")

  need((c.num_steps or 0) > 0 or c.num_epochs > 0,
       "set a positive training length: num_epochs or num_steps")
  need(c.warmup_epochs >= 0 and (c.warmup_steps is None or c.warmup_steps >= 0),
       "warmup_epochs/warmup_steps must be >= 0")
  for key in ("eval_every", "checkpoint_every"):
    steps, epochs = c[f"{key}_steps"], c[f"{key}_epochs"]
    need((steps or 0) > 0 or epochs > 0,
         f"set {key}_steps or {key}_epochs to a positive value (training end always counts)")
  need(c.log_every_steps >= 1, f"log_every_steps={c.log_every_steps} must be >= 1")
  need(c.keep_checkpoints >= 1, f"keep_checkpoints={c.keep_checkpoints} must be >= 1")

  o = c.optimizer
  need(o.name == "adamw", f"optimizer.name={o.name!r}: only 'adamw' (the published recipe)")
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1/b2 must be in [0, 1), got {o.b1}/{o.b2}")
  need(o.eps > 0, f"optimizer.eps={o.eps} must be positive")
  need(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
  need(c.grad_clip_norm >= 0, f"grad_clip_norm={c.grad_clip_norm} must be >= 0 (0: off)")
  need(c.lr.base > 0 and c.lr.warmup >= 0 and c.lr.min >= 0,
       f"lr.base/warmup/min must be positive/non-negative, got {c.lr.base}/{c.lr.warmup}/{c.lr.min}")
  need(c.lr.schedule in _SCHEDULES, f"lr.schedule={c.lr.schedule!r} must be one of {_SCHEDULES}")
  try:
    optim.lr_scale_factor(c.lr.scaling, 1)
  except ValueError as e:
    errs.append(str(e))
  need(0 <= c.ema_decay < 1, f"ema_decay={c.ema_decay} must be in [0, 1) (0: no EMA)")

  d = c.data
  need(0 <= d.label_smoothing < 1, f"data.label_smoothing={d.label_smoothing} must be in [0, 1)")
  need(d.mixup_alpha >= 0 and d.cutmix_alpha >= 0, "data.mixup_alpha/cutmix_alpha must be >= 0")
  need(d.source != "folder" or d.folder_root,
       "data.source='folder' needs --config.data.folder_root=/path/with/train/and/val")
  if c.init_from:
    need(os.path.exists(c.init_from),
         f"init_from={c.init_from!r} does not exist; give a converted checkpoint directory "
         "or a .pth file")
  if errs:
    raise ConfigError(errs[0] + (f" (and {len(errs) - 1} more problem(s): "
                                 + " | ".join(errs[1:]) + ")" if len(errs) > 1 else ""))


def _interval(steps: int | None, epochs: float, steps_per_epoch: float) -> int:
  if steps:
    return int(steps)
  return max(1, int(round(epochs * steps_per_epoch)))


def make_plan(config, info) -> Plan:
  """Resolves epochs to steps, the lr rule and class/image counts. Raises ConfigError."""
  c = config
  steps_per_epoch = info.num_train / c.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"batch_size={c.batch_size} is larger than the training split "
                      f"({info.num_train} examples); lower it")
  total = int(c.num_steps) if c.num_steps else int(math.ceil(c.num_epochs * steps_per_epoch))
  warmup = (int(c.warmup_steps) if c.warmup_steps is not None
            else int(round(c.warmup_epochs * steps_per_epoch)))
  if warmup >= total:
    raise ConfigError(f"warmup ({warmup} steps) must be shorter than training ({total} steps); "
                      "lower warmup_epochs/warmup_steps")
  factor = optim.lr_scale_factor(c.lr.scaling, c.batch_size)
  return Plan(
      num_classes=int(c.model.num_classes or info.num_classes),
      image_size=int(c.model.img_size or c.data.image_size),
      num_train=int(info.num_train), num_eval=int(info.num_eval),
      steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup,
      eval_every=_interval(c.eval_every_steps, c.eval_every_epochs, steps_per_epoch),
      checkpoint_every=_interval(c.checkpoint_every_steps, c.checkpoint_every_epochs,
                                 steps_per_epoch),
      base_lr=c.lr.base * factor, warmup_lr=c.lr.warmup * factor, min_lr=c.lr.min * factor,
      lr_factor=factor, eval_batch_size=int(c.eval_batch_size or c.batch_size))
