"""Host input pipeline: dataset info, per-host train/eval iterators of global jax.Arrays.

    cfg = config.default_data_config()                  # strip_mlp.data.config
    info = get_dataset_info(cfg)                        # num_classes, num_train, num_eval, ...
    train = create_train_iterator(cfg, 256, sharding, seed=0, start_step=0)
    batch = next(train)   # {'image': f32 (256, R, R, 3), 'label': int32 (256,)} global arrays
    for batch in create_eval_iterator(cfg, 256, sharding):   # + 'mask' f32 (256,), 1 = real
      ...

Each process reads a disjoint part of the split (tfds.split_for_jax_process for TFDS, every
process_count-th file for folders); local batch = global batch / process count; the local
batches become one global jax.Array per key via jax.make_array_from_process_local_data.

Training stream (per process): epoch e = this process's examples shuffled with a seed from
(seed, process_index, e); example i of epoch e is augmented with the stateless seed
fold_in(fold_in((seed, process_index), e), i). Epochs are concatenated and batched, so
`start_step` resumes at exactly the same example and augmentation (for TFDS datasets larger
than shuffle_buffer only the order of files inside the resumed epochs can differ).
Evaluation: every example exactly once; the last batch is padded with mask 0 and every process
yields num_eval_batches() batches.

This module imports TensorFlow (CPU only: GPUs are hidden from it); `strip_mlp/__init__` and
`strip_mlp.data.config` must not import it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import jax
import tensorflow as tf

from strip_mlp.data import digits, folders, sources, transforms

# re-exported:
from strip_mlp.runtime.sharding import device_iterator, to_global_arrays  # noqa: F401
from strip_mlp.data.config import (  # noqa: F401  (DatasetInfo: re-exported)
    EMBEDDED_DATASETS,
    DatasetInfo,
    IMAGE_DTYPES,
    JPEG_DCT_METHOD,
    SOURCES,
    local_batch_size,
)

# What tf.data raises for an unreadable or corrupt file of the dataset.
ReadError = tf.errors.OpError

try:  # TensorFlow must never grab accelerator memory: JAX owns the devices.
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised / no such device type
  pass


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=16)
def _open_source(
    source: str,
    name: str,
    data_dir,
    manual_dir,
    prepare: bool,
    folder_root,
    image_key: str,
    label_key: str,
):
  if source == "folder":
    return folders.FolderSource(folder_root)
  if source == "embedded" or (source == "tfds" and name in EMBEDDED_DATASETS):
    return sources.TfdsSource(digits.load_builder(name, data_dir), image_key, label_key)
  if source == "tfds":
    return sources.TfdsSource.from_name(
        name, data_dir, manual_dir, prepare, image_key=image_key, label_key=label_key
    )
  raise ValueError(f"unknown data.source {source!r}: use one of {SOURCES}")


def get_source(cfg, shuffle_files_seed: int | None = None) -> sources.Source:
  """The dataset source named by cfg (cached; folder listings are made once)."""
  src = _open_source(
      cfg.source,
      cfg.name,
      cfg.data_dir,
      cfg.manual_dir,
      bool(cfg.prepare),
      cfg.folder_root,
      cfg.image_key,
      cfg.label_key,
  )
  if shuffle_files_seed is not None and isinstance(src, sources.TfdsSource):
    src = sources.TfdsSource(src.builder, src.image_key, src.label_key, shuffle_files_seed)
  return src


def _eval_split(cfg, src) -> str:
  return cfg.eval_split or src.default_eval_split()


def get_dataset_info(cfg) -> DatasetInfo:
  """num_classes (cfg.num_classes or the dataset's), split sizes, image size."""
  src = get_source(cfg)
  eval_split = _eval_split(cfg, src)
  return DatasetInfo(
      name=src.name,
      num_classes=int(cfg.num_classes or src.num_classes),
      num_train=src.num_examples(cfg.train_split),
      num_eval=src.num_examples(eval_split),
      image_size=int(cfg.image_size),
      train_split=cfg.train_split,
      eval_split=eval_split,
  )


def transform_config(cfg) -> transforms.TransformConfig:
  """The per-example transform settings of cfg."""
  return transforms.TransformConfig(
      image_size=int(cfg.image_size),
      interpolation=cfg.interpolation,
      random_resized_crop=bool(cfg.random_resized_crop),
      resize_random_crop=bool(cfg.get("resize_random_crop", False)),
      rrc_scale=tuple(cfg.rrc_scale),
      rrc_ratio=tuple(cfg.rrc_ratio),
      small_image_size=int(cfg.small_image_size),
      small_image_padding=int(cfg.small_image_padding),
      hflip_prob=float(cfg.hflip_prob),
      randaugment=cfg.randaugment or None,
      random_erasing_prob=float(cfg.random_erasing_prob),
      random_erasing_mode=cfg.random_erasing_mode,
      random_erasing_count=int(cfg.random_erasing_count),
      eval_crop=bool(cfg.eval_crop),
      eval_resize_ratio=float(cfg.eval_resize_ratio),
      mean=tuple(cfg.mean),
      std=tuple(cfg.std),
      jpeg_dct_method=cfg.get("jpeg_dct_method", JPEG_DCT_METHOD),
      train_pil_resize=bool(cfg.get("train_pil_resize", False)),
  )


# ----------------------------------------------------------------------------- tf.data


def _process(process_index, process_count) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index {pi} not in [0, {pc})")
  return pi, pc


def _options(cfg) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = bool(cfg.deterministic)
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  return options


def _tf_dtype(cfg):
  if cfg.image_dtype not in IMAGE_DTYPES:
    raise ValueError(f"data.image_dtype must be one of {IMAGE_DTYPES}, got {cfg.image_dtype!r}")
  return tf.bfloat16 if cfg.image_dtype == "bfloat16" else tf.float32


def _autotune(n: int) -> int:
  return tf.data.AUTOTUNE if n is None or n < 0 else int(n)


def _decoder(cfg):
  """Encoded bytes -> uint8 image, decoded as the transforms do (to find undecodable files)."""
  dct_method = cfg.get("jpeg_dct_method", JPEG_DCT_METHOD)
  return lambda data: transforms.decode_full(data, dct_method)


def create_train_dataset(
    cfg,
    local_batch: int,
    seed: int,
    start_step: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
  """Infinite tf.data.Dataset of this process's batches {'image': (b, R, R, 3), 'label': (b,)}.

  With cfg.skip_undecodable, examples whose transform fails are dropped and batches carry
  'position' int64 (b,) too, each example's index in this process's stream (epoch * n_local +
  index in the epoch), from which the iterators count the skipped ones.
  """
  # File order of large TFDS datasets: a fixed per-(seed, process) shuffle, reshuffled per epoch.
  src = get_source(cfg, shuffle_files_seed=int(seed) * 1_000_003 + process_index)
  split = cfg.train_split
  n_local = src.num_examples(split) // process_count
  if n_local < 1:
    raise ValueError(f"split {split!r} of {src.name} has fewer examples than processes")
  base = src.read(split, process_index, process_count, drop_remainder=True)
  if cfg.cache:
    base = base.cache()
  buffer = max(1, min(int(cfg.shuffle_buffer), n_local))
  proc_seed = tf.constant([int(seed), int(process_index)], tf.int64)

  @tf.autograph.experimental.do_not_convert
  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(proc_seed, e)
    shuffle_seed = tf.random.stateless_uniform(
        [], epoch_seed, minval=None, maxval=None, dtype=tf.int64
    )
    ds = base.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).enumerate()
    return ds.map(
        tf.autograph.experimental.do_not_convert(
            lambda i, ex: (
                tf.random.experimental.stateless_fold_in(epoch_seed, i),
                ex,
                e * n_local + i,
            )
        )
    )

  start_epoch, offset = divmod(int(start_step) * local_batch, n_local)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  tc = transform_config(cfg)
  dtype = _tf_dtype(cfg)

  skip = bool(cfg.get("skip_undecodable", False))

  @tf.autograph.experimental.do_not_convert  # plain graph code: skip autograph (faster trace)
  def augment(example_seed, ex, position):
    image = transforms.train_transform(ex["image"], example_seed, tc)
    out = {"image": tf.cast(image, dtype), "label": tf.cast(ex["label"], tf.int32)}
    return dict(out, position=position) if skip else out

  ds = ds.map(augment, num_parallel_calls=_autotune(cfg.num_parallel_calls))
  if skip:
    ds = ds.ignore_errors()
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(_autotune(cfg.prefetch)).with_options(_options(cfg))


def num_eval_batches(cfg, global_batch_size: int, *, process_count: int | None = None) -> int:
  """Batches every process yields in evaluation: ceil(ceil(num_eval / P) / local batch)."""
  _, pc = _process(0, process_count)
  local = local_batch_size(global_batch_size, pc)
  src = get_source(cfg)
  n = src.num_examples(_eval_split(cfg, src))
  return math.ceil(math.ceil(n / pc) / local)


def create_eval_dataset(
    cfg, local_batch: int, num_batches: int, *, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """Finite tf.data.Dataset of exactly `num_batches` batches {'image', 'label', 'mask'}:
  this process's part of the eval split once, then zero images with mask 0.

  With cfg.skip_undecodable, examples whose transform fails are dropped (more padding follows)
  and batches carry 'position' int64 (b,) too: the example's index in this process's part,
  -1 for padding.
  """
  src = get_source(cfg)
  split = _eval_split(cfg, src)
  ds = src.read(split, process_index, process_count, drop_remainder=False)
  if cfg.cache:
    ds = ds.cache()
  tc = transform_config(cfg)
  dtype = _tf_dtype(cfg)
  size = int(cfg.image_size)

  skip = bool(cfg.get("skip_undecodable", False))

  @tf.autograph.experimental.do_not_convert
  def prepare(position, ex):
    image = transforms.eval_transform(ex["image"], tc)
    out = {
        "image": tf.cast(image, dtype),
        "label": tf.cast(ex["label"], tf.int32),
        "mask": tf.constant(1.0, tf.float32),
    }
    return dict(out, position=position) if skip else out

  ds = ds.enumerate().map(prepare, num_parallel_calls=_autotune(cfg.num_parallel_calls))
  padding = {
      "image": tf.zeros([size, size, 3], dtype),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0, tf.float32),
  }
  if skip:
    ds = ds.ignore_errors()
    padding["position"] = tf.constant(-1, tf.int64)
  pad = tf.data.Dataset.from_tensors(padding).repeat()
  ds = ds.concatenate(pad).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(_autotune(cfg.prefetch)).with_options(_options(cfg))


# ----------------------------------------------------------------------------- global arrays


def create_train_iterator(
    cfg,
    global_batch_size: int,
    sharding,
    seed: int,
    start_step: int = 0,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Infinite iterator of {'image': f32 (B, R, R, 3), 'label': int32 (B,)} global jax.Arrays
  sharded like `sharding` (batch dim first; None: this process's numpy batches).

  Resumes exactly at `start_step`. process_index/count default to JAX's (override to simulate
  hosts; the arrays then hold this simulated process's part only).
  """
  pi, pc = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, pc)
  ds = create_train_dataset(cfg, local, seed, start_step, process_index=pi, process_count=pc)
  batches = sources.checked_batches(
      ds,
      get_source(cfg),
      cfg.train_split,
      pi,
      pc,
      drop_remainder=True,
      decode=_decoder(cfg),
      skip=bool(cfg.get("skip_undecodable", False)),
      first_position=int(start_step) * local,
  )
  return device_iterator(batches, sharding, cfg.device_prefetch)


def create_eval_iterator(
    cfg,
    global_batch_size: int,
    sharding,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Finite iterator of {'image', 'label', 'mask'} global batches covering the eval split
  exactly once; padding has mask 0; every process yields num_eval_batches() batches."""
  pi, pc = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, pc)
  n_batches = num_eval_batches(cfg, global_batch_size, process_count=pc)
  ds = create_eval_dataset(cfg, local, n_batches, process_index=pi, process_count=pc)
  src = get_source(cfg)
  split = _eval_split(cfg, src)
  real = int(src.read(split, pi, pc, drop_remainder=False).cardinality())  # -2: unknown
  batches = sources.checked_batches(
      ds,
      src,
      split,
      pi,
      pc,
      drop_remainder=False,
      decode=_decoder(cfg),
      skip=bool(cfg.get("skip_undecodable", False)),
      expected=real if real >= 0 else None,
  )
  return device_iterator(batches, sharding, cfg.device_prefetch)
