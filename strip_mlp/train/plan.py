"""Validates a training config and derives the run's plan (steps, lr, intervals).

`validate_config` checks what is known without reading data or compiling (with
`validate_data_config` for the `data` keys, which eval.py uses on its own);
`read_dataset_info` opens the dataset and turns what is wrong with it into one line;
`make_plan` resolves epochs to steps, the lr scaling rule and the class count once the
dataset's sizes are known. All raise `UserError` subclasses (mostly `ConfigError`) with
one line that says what to change. This module does not import TensorFlow when it is
imported.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import ml_collections

from strip_mlp.models import ops
from strip_mlp.train import optim
from strip_mlp.data import config as data_config
from strip_mlp.errors import ConfigError, UserError
from strip_mlp.models.strip_mlp import VARIANTS, validate_architecture


@dataclasses.dataclass(frozen=True)
class Plan:
  """Durations and sizes derived from the config and the dataset.

  eval_every / checkpoint_every: steps between evaluations / checkpoints; fractional when
  set in epochs (N epochs = N * steps_per_epoch steps), so that they fall on the first step
  at or after each multiple of N epochs (train_helpers.is_time) and a run of a whole number
  of such intervals evaluates and saves once at its end, not also a step or two before it.
  """

  num_classes: int
  image_size: int
  num_train: int
  num_eval: int
  steps_per_epoch: float
  total_steps: int
  warmup_steps: int
  eval_every: float
  checkpoint_every: float
  base_lr: float
  warmup_lr: float
  min_lr: float
  lr_factor: float
  eval_batch_size: int
  cooldown_steps: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_SCHEDULES = ("cosine", "constant")
_DTYPES = ("float32", "bfloat16", "float16")


def _raise_first(errs: list[str]) -> None:
  if errs:
    raise ConfigError(
        errs[0]
        + (
            f" (and {len(errs) - 1} more problem(s): " + " | ".join(errs[1:]) + ")"
            if len(errs) > 1
            else ""
        )
    )


def validate_config(
    config: ml_collections.ConfigDict,
    num_devices: int | None = None,
    num_processes: int | None = None,
    *,
    check_devices: bool = True,
) -> None:
  """Raises ConfigError with one clear line when a value cannot work.

  Checks only what is known without reading data or compiling (unknown keys are refused
  earlier, by the locked ConfigDict / config_flags). num_devices/num_processes default to
  JAX's counts (which starts the backend); check_devices=False leaves out what depends on
  them, for a first pass before jax.distributed is initialised.
  """
  if check_devices:
    n_dev = jax.device_count() if num_devices is None else num_devices
    n_proc = jax.process_count() if num_processes is None else num_processes
  else:
    n_dev = n_proc = None
  errs = _model_errors(config) + _training_errors(config, n_dev, n_proc)
  errs += data_config.config_errors(config.data)
  if config.init_from:
    if not os.path.exists(config.init_from):
      errs.append(
          f"init_from={config.init_from!r} does not exist; give a converted "
          "checkpoint directory or a .pth file"
      )
  _raise_first(errs)


def validate_data_config(data: ml_collections.ConfigDict) -> None:
  """ConfigError for `data.*` values that cannot work (also used by eval.py)."""
  _raise_first(data_config.config_errors(data))


def _errors():
  errs = []

  def need(ok, msg):
    if not ok:
      errs.append(msg)

  return errs, need


def _model_errors(c) -> list[str]:
  errs, need = _errors()
  m = c.model
  need(
      c.get("init_resize", "") in ("", "interpolate"),
      f"init_resize={c.get('init_resize')!r} must be '' or 'interpolate'",
  )
  if m.get("name"):
    from strip_mlp.models import registry  # pylint: disable=g-import-not-at-top

    names = sorted(registry.all_variants())
    need(m.name in names, f"model.name={m.name!r} must be one of {names} ('': Strip-MLP)")
    need(
        0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate={m.drop_path_rate} must be in [0, 1)"
    )
    need(m.dtype in _DTYPES, f"model.dtype={m.dtype!r} must be one of {_DTYPES}")
    return errs
  need(
      m.variant in VARIANTS or (not m.variant and m.embed_dim and m.layers),
      f"model.variant={m.variant!r} must be one of {sorted(VARIANTS)} (or '' with "
      "model.embed_dim and model.layers set)",
  )
  if m.layers is not None:
    need(
        len(m.layers) == 4 and all(isinstance(n, int) and n >= 0 for n in m.layers),
        f"model.layers={tuple(m.layers)} must be 4 block counts, e.g. '(2,2,6,2)'",
    )
  need(
      m.embed_dim is None or m.embed_dim > 0,
      f"model.embed_dim={m.embed_dim} must be positive, e.g. 80 (or None: the variant's)",
  )
  need(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate={m.drop_path_rate} must be in [0, 1)")
  need(m.dtype in _DTYPES, f"model.dtype={m.dtype!r} must be one of {_DTYPES}")
  for kind in ("depthwise", "patchify"):
    impl = m.get(f"{kind}_impl", "auto")
    choices = ("auto",) + ops._CHOICES[kind]  # pylint: disable=protected-access
    need(impl in choices, f"model.{kind}_impl={impl!r} must be one of {choices}")
  img = m.img_size or c.data.image_size
  need(
      img and img > 0 and img % 32 == 0,
      f"image size {img} (model.img_size / " "data.image_size) must be a positive multiple of 32",
  )
  need(
      m.img_size is None or m.img_size == c.data.image_size,
      f"model.img_size={m.img_size} differs from data.image_size={c.data.image_size}; set "
      "data.image_size (the model follows it)",
  )
  need(
      m.num_classes is None or m.num_classes > 0,
      f"model.num_classes={m.num_classes} must be positive (or None: from the dataset)",
  )
  if not errs:  # the sizes the model will have: can the strip layers split them?
    arch = dict(VARIANTS.get(m.variant, {}))
    arch.update({k: m[k] for k in ("embed_dim", "layers") if m[k]})
    try:
      validate_architecture(
          int(arch["embed_dim"]), tuple(arch["layers"]), int(img), int(m.num_classes or 1)
      )
    except ValueError as e:
      errs.append(f"model.{e}")
  return errs


def _training_errors(c, n_dev: int | None, n_proc: int | None) -> list[str]:
  """The training keys; with n_dev/n_proc None, only what does not depend on them."""
  errs, need = _errors()
  need(c.batch_size > 0, f"batch_size={c.batch_size} must be positive")
  need(
      c.grad_accum_steps >= 1 and c.batch_size % c.grad_accum_steps == 0,
      f"grad_accum_steps={c.grad_accum_steps} must be >= 1 and divide batch_size="
      f"{c.batch_size}",
  )
  g = c.get("group_size") or 0
  micro = c.batch_size // max(c.grad_accum_steps, 1)
  need(
      g >= 0 and (g == 0 or micro % g == 0),
      f"group_size={g} must be 0 (BatchNorm statistics and mixup over the whole batch) or "
      f"divide the micro-batch (batch_size / grad_accum_steps = {micro}); the released "
      "per-GPU batch is 128",
  )
  eb = c.eval_batch_size or c.batch_size
  need(eb > 0, f"eval_batch_size={eb} must be positive")
  need(c.mesh.fsdp >= 1, f"mesh.fsdp={c.mesh.fsdp} must be >= 1")
  if n_dev is not None and not errs:
    need(
        c.batch_size % n_dev == 0,
        f"batch_size={c.batch_size} must be a positive multiple of the device count ({n_dev})",
    )
    need(
        c.batch_size % n_proc == 0,
        f"batch_size={c.batch_size} must be a multiple of the process count ({n_proc})",
    )
    if c.grad_accum_steps > 1 and c.batch_size % n_dev == 0:
      need(
          c.batch_size % (c.grad_accum_steps * n_dev) == 0,
          f"grad_accum_steps={c.grad_accum_steps} must split batch_size={c.batch_size} into "
          f"micro-batches that are multiples of the device count ({n_dev})",
      )
    need(
        eb % n_dev == 0,
        f"eval_batch_size={eb} must be a positive multiple of the device count ({n_dev})",
    )
    need(
        n_dev % c.mesh.fsdp == 0,
        f"mesh.fsdp={c.mesh.fsdp} must be >= 1 and divide the device count ({n_dev})",
    )

  if c.num_steps is not None:
    need(
        c.num_steps > 0,
        f"num_steps={c.num_steps} must be positive (or None: num_epochs " "sets the length)",
    )
  else:
    need(c.num_epochs > 0, f"num_epochs={c.num_epochs} must be positive (or set num_steps)")
  for key in ("warmup", "cooldown"):
    steps, epochs = c.get(f"{key}_steps"), c.get(f"{key}_epochs", 0.0)
    need(epochs >= 0, f"{key}_epochs={epochs} must be >= 0")
    need(steps is None or steps >= 0, f"{key}_steps={steps} must be >= 0 (or None: {key}_epochs)")
  for key in ("eval_every", "checkpoint_every"):
    steps, epochs = c[f"{key}_steps"], c[f"{key}_epochs"]
    if steps is not None:
      need(steps > 0, f"{key}_steps={steps} must be positive (or None: {key}_epochs)")
    else:
      need(
          epochs > 0,
          f"{key}_epochs={epochs} must be positive (or set {key}_steps); the "
          "end of training is always evaluated and saved",
      )
  need(c.log_every_steps >= 1, f"log_every_steps={c.log_every_steps} must be >= 1")
  need(c.keep_checkpoints >= 1, f"keep_checkpoints={c.keep_checkpoints} must be >= 1")

  return errs + _optimizer_errors(c)


def _optimizer_errors(c) -> list[str]:
  """The optimizer, lr and EMA keys."""
  errs, need = _errors()
  o = c.optimizer
  need(o.name == "adamw", f"optimizer.name={o.name!r}: only 'adamw' (the published recipe)")
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1/b2 must be in [0, 1), got {o.b1}/{o.b2}")
  need(o.eps > 0, f"optimizer.eps={o.eps} must be positive")
  need(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
  masks = tuple(optim.WEIGHT_DECAY_MASKS)
  need(
      o.get("weight_decay_params", "matrices") in masks,
      f"optimizer.weight_decay_params={o.get('weight_decay_params')!r} must be one of {masks}",
  )
  need(c.grad_clip_norm >= 0, f"grad_clip_norm={c.grad_clip_norm} must be >= 0 (0: off)")
  need(c.lr.base > 0, f"lr.base={c.lr.base} must be positive")
  need(
      c.lr.warmup >= 0 and c.lr.min >= 0,
      f"lr.warmup/lr.min must be >= 0, got {c.lr.warmup}/{c.lr.min}",
  )
  need(c.lr.schedule in _SCHEDULES, f"lr.schedule={c.lr.schedule!r} must be one of {_SCHEDULES}")
  timings = tuple(optim.LR_TIMINGS)
  need(
      c.lr.get("timing", "released") in timings,
      f"lr.timing={c.lr.get('timing')!r} must be one of {timings}",
  )
  try:
    optim.lr_scale_factor(c.lr.scaling, 1)
  except ValueError as e:
    errs.append(str(e))
  need(0 <= c.ema_decay < 1, f"ema_decay={c.ema_decay} must be in [0, 1) (0: no EMA)")
  return errs


def read_dataset_info(data: ml_collections.ConfigDict):
  """`strip_mlp.data.pipeline.get_dataset_info(data)`, with ConfigError (one line) for a dataset
  that cannot be opened: unknown TFDS name or split, folder layout, unreadable data_dir.

  The source is cached by the input pipeline, so training opens it only once.
  """
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top

  try:
    return pipeline.get_dataset_info(data)
  except UserError:
    raise
  except (ValueError, KeyError, OSError, pipeline.ReadError) as e:
    what = getattr(e, "message", None) or str(e)
    what = " ".join(what.split()) or type(e).__name__
    where = (
        f"data.folder_root={data.folder_root!r}"
        if data.source == "folder"
        else f"data.source={data.source!r}, data.name={data.name!r}"
    )
    raise ConfigError(f"cannot open the dataset ({where}): {what}") from None


def _interval(steps: int | None, epochs: float, steps_per_epoch: float) -> float:
  """Steps between two events: `steps` when set, else `epochs` epochs (not rounded), >= 1."""
  if steps:
    return float(steps)
  return max(1.0, epochs * steps_per_epoch)


def make_plan(config, info) -> Plan:
  """Resolves epochs to steps, the lr rule and class/image counts. Raises ConfigError."""
  c = config
  steps_per_epoch = info.num_train / c.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(
        f"batch_size={c.batch_size} is larger than the training split "
        f"({info.num_train} examples); lower it"
    )
  if c.num_steps is not None and c.num_steps <= 0:
    raise ConfigError(
        f"num_steps={c.num_steps} must be positive (or None: num_epochs sets " "the length)"
    )
  total = int(c.num_steps) if c.num_steps else int(math.ceil(c.num_epochs * steps_per_epoch))
  if total <= 0:
    raise ConfigError(f"num_epochs={c.num_epochs} gives {total} steps; it must be positive")
  warmup, cooldown = (
      int(c.get(f"{k}_steps"))
      if c.get(f"{k}_steps") is not None
      else int(round(c.get(f"{k}_epochs", 0.0) * steps_per_epoch))
      for k in ("warmup", "cooldown")
  )
  if warmup + cooldown >= total:
    raise ConfigError(
        f"warmup + cooldown ({warmup} + {cooldown} steps) must be shorter than training "
        f"({total} steps); lower warmup_epochs/cooldown_epochs (or *_steps) or train longer"
    )
  n = c.model.num_classes
  if n is not None and n < info.num_classes:
    name = getattr(info, "name", "the dataset")
    raise ConfigError(
        f"model.num_classes={n} is smaller than the {info.num_classes} classes of {name}: "
        f"labels {n}..{info.num_classes - 1} would have no logit (NaN loss); leave "
        f"model.num_classes unset (None: the dataset's count) or set it >= {info.num_classes}"
    )
  factor = optim.lr_scale_factor(c.lr.scaling, c.batch_size)
  return Plan(
      num_classes=int(c.model.num_classes or info.num_classes),
      image_size=int(c.model.img_size or c.data.image_size),
      num_train=int(info.num_train),
      num_eval=int(info.num_eval),
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      warmup_steps=warmup,
      eval_every=_interval(c.eval_every_steps, c.eval_every_epochs, steps_per_epoch),
      checkpoint_every=_interval(
          c.checkpoint_every_steps, c.checkpoint_every_epochs, steps_per_epoch
      ),
      base_lr=c.lr.base * factor,
      warmup_lr=c.lr.warmup * factor,
      min_lr=c.lr.min * factor,
      lr_factor=factor,
      eval_batch_size=int(c.eval_batch_size or c.batch_size),
      cooldown_steps=cooldown,
  )
