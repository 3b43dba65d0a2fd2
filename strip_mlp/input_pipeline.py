"""Host input pipeline: config, dataset info, per-host train/eval iterators of global jax.Arrays.

    cfg = default_data_config()                         # ml_collections.ConfigDict
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

This module imports TensorFlow (CPU only: GPUs are hidden from it); `strip_mlp/__init__` must
not import it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from ml_collections import config_dict

from strip_mlp import data_sources, digits, transforms

try:  # TensorFlow must never grab accelerator memory: JAX owns the devices.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
except (RuntimeError, ValueError):  # already initialised / no such device type
  pass

SOURCES = ('tfds', 'folder', 'embedded')

# For the offline digits demo: digits are not mirror-symmetric and 1.4k 32-px images are
# learned in minutes without the ImageNet regularisers (a 4-block Strip-MLP, embed 32: 99% test
# accuracy after 300 steps of 64 with these; ~90% after 400 steps with the full recipe).
DIGITS_DEMO_OVERRIDES = dict(hflip_prob=0.0, randaugment='', random_erasing_prob=0.0,
                             mixup_alpha=0.0, cutmix_alpha=0.0)


def default_data_config() -> ml_collections.ConfigDict:
  """Data config with the published recipe's augmentation; source = the embedded digits."""
  c = ml_collections.ConfigDict()
  # --- where the data comes from
  c.source = 'embedded'                 # 'tfds' | 'folder' | 'embedded'
  c.name = 'digits'                     # TFDS name ('imagenet2012', 'cifar10', ...) or embedded name
  c.data_dir = config_dict.placeholder(str)     # TFDS data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.manual_dir = config_dict.placeholder(str)   # manual downloads (None: data_dir/downloads/manual)
  c.prepare = False                     # tfds: download_and_prepare when missing (needs network)
  c.folder_root = config_dict.placeholder(str)  # folder source: root/train/<class>/*, root/val/<class>/*
  c.train_split = 'train'
  c.eval_split = config_dict.placeholder(str)   # None: 'validation', 'val' or 'test', whichever exists
  c.image_key = 'image'
  c.label_key = 'label'
  c.image_size = 32                     # R; the recipe uses 224
  c.num_classes = config_dict.placeholder(int)  # None: from the dataset
  c.skip_undecodable = False            # False: an image that fails to decode stops the run with
                                        # its path; True: skip such images, counted in the log
  # --- throughput
  c.shuffle_buffer = 16_384             # examples (encoded) per process; capped at the split size
  c.cache = False                       # cache the (encoded) local split in memory
  c.prefetch = 2                        # tf.data batches prefetched (-1: autotune)
  c.device_prefetch = 2                 # global batches put on device ahead of use
  c.num_parallel_calls = -1             # parallel decode/augment calls (-1: autotune)
  c.deterministic = True                # tf.data deterministic order
  c.image_dtype = 'float32'             # 'float32' | 'bfloat16' (halves host->device bytes)
  # --- train augmentation (timm create_transform as in the official trainer)
  c.interpolation = 'bicubic'           # 'bicubic' | 'bilinear': PIL's exactly (in eval);
                                        # 'tf_bicubic', 'area', ...: tf.image.resize
  c.train_pil_resize = False            # PIL-exact resizing in training too (~2 ms CPU/image
                                        # more); False: tf.image.resize there (~0.1 level off)
  c.jpeg_dct_method = 'INTEGER_ACCURATE'  # PIL's IDCT; '' = TF's default (fast, ~1 level off)
  c.random_resized_crop = True
  c.rrc_scale = (0.08, 1.0)
  c.rrc_ratio = (3 / 4, 4 / 3)
  c.small_image_size = 32               # image_size <= this: pad + random crop instead of RRC
  c.small_image_padding = 4             # 0: use random_resized_crop for small images too
  c.hflip_prob = 0.5
  c.randaugment = 'rand-m9-mstd0.5-inc1'  # '' disables
  c.random_erasing_prob = 0.25
  c.random_erasing_mode = 'pixel'       # 'pixel' | 'rand' | 'const'
  c.random_erasing_count = 1
  # --- eval transform
  c.eval_crop = True                    # resize shorter side to int(R*ratio), center crop R
  c.eval_resize_ratio = 256 / 224
  c.mean = transforms.IMAGENET_MEAN
  c.std = transforms.IMAGENET_STD
  # --- batch-level mixing (applied in the train step by strip_mlp.mixup.mixup_cutmix)
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.label_smoothing = 0.1
  return c


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts of the configured dataset (also readable as info['num_classes'])."""
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  image_size: int
  train_split: str
  eval_split: str

  def __getitem__(self, key):
    return getattr(self, key)


# ----------------------------------------------------------------------------- sources

@functools.lru_cache(maxsize=16)
def _open_source(source: str, name: str, data_dir, manual_dir, prepare: bool, folder_root,
                 image_key: str, label_key: str):
  if source == 'folder':
    return data_sources.FolderSource(folder_root)
  if source == 'embedded' or (source == 'tfds' and name in digits.EMBEDDED_BUILDERS):
    return data_sources.TfdsSource(digits.load_builder(name, data_dir), image_key, label_key)
  if source == 'tfds':
    return data_sources.TfdsSource.from_name(name, data_dir, manual_dir, prepare,
                                             image_key=image_key, label_key=label_key)
  raise ValueError(f'unknown data.source {source!r}: use one of {SOURCES}')


def get_source(cfg, shuffle_files_seed: int | None = None) -> data_sources.Source:
  """The dataset source named by cfg (cached; folder listings are made once)."""
  src = _open_source(cfg.source, cfg.name, cfg.data_dir, cfg.manual_dir, bool(cfg.prepare),
                     cfg.folder_root, cfg.image_key, cfg.label_key)
  if shuffle_files_seed is not None and isinstance(src, data_sources.TfdsSource):
    src = data_sources.TfdsSource(src.builder, src.image_key, src.label_key, shuffle_files_seed)
  return src


def _eval_split(cfg, src) -> str:
  return cfg.eval_split or src.default_eval_split()


def get_dataset_info(cfg) -> DatasetInfo:
  """num_classes (cfg.num_classes or the dataset's), split sizes, image size."""
  src = get_source(cfg)
  eval_split = _eval_split(cfg, src)
  return DatasetInfo(name=src.name, num_classes=int(cfg.num_classes or src.num_classes),
                     num_train=src.num_examples(cfg.train_split),
                     num_eval=src.num_examples(eval_split), image_size=int(cfg.image_size),
                     train_split=cfg.train_split, eval_split=eval_split)


def transform_config(cfg) -> transforms.TransformConfig:
  """The per-example transform settings of cfg."""
  return transforms.TransformConfig(
      image_size=int(cfg.image_size), interpolation=cfg.interpolation,
      random_resized_crop=bool(cfg.random_resized_crop), rrc_scale=tuple(cfg.rrc_scale),
      rrc_ratio=tuple(cfg.rrc_ratio), small_image_size=int(cfg.small_image_size),
      small_image_padding=int(cfg.small_image_padding), hflip_prob=float(cfg.hflip_prob),
      randaugment=cfg.randaugment or None, random_erasing_prob=float(cfg.random_erasing_prob),
      random_erasing_mode=cfg.random_erasing_mode,
      random_erasing_count=int(cfg.random_erasing_count), eval_crop=bool(cfg.eval_crop),
      eval_resize_ratio=float(cfg.eval_resize_ratio), mean=tuple(cfg.mean), std=tuple(cfg.std),
      jpeg_dct_method=cfg.get('jpeg_dct_method', transforms.JPEG_DCT_METHOD),
      train_pil_resize=bool(cfg.get('train_pil_resize', False)))


# ----------------------------------------------------------------------------- tf.data

def _process(process_index, process_count) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f'process_index {pi} not in [0, {pc})')
  return pi, pc


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """global batch / process count (must divide)."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of the '
                     f'process count {process_count}')
  return global_batch_size // process_count


def _options(cfg) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = bool(cfg.deterministic)
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  return options


def _tf_dtype(cfg):
  if cfg.image_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"data.image_dtype must be 'float32' or 'bfloat16', got {cfg.image_dtype!r}")
  return tf.bfloat16 if cfg.image_dtype == 'bfloat16' else tf.float32


def _autotune(n: int) -> int:
  return tf.data.AUTOTUNE if n is None or n < 0 else int(n)


def _decoder(cfg):
  """Encoded bytes -> uint8 image, decoded as the transforms do (to find undecodable files)."""
  dct_method = cfg.get('jpeg_dct_method', transforms.JPEG_DCT_METHOD)
  return lambda data: transforms.decode_full(data, dct_method)


def create_train_dataset(cfg, local_batch: int, seed: int, start_step: int = 0, *,
                         process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
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
    raise ValueError(f'split {split!r} of {src.name} has fewer examples than processes')
  base = src.read(split, process_index, process_count, drop_remainder=True)
  if cfg.cache:
    base = base.cache()
  buffer = max(1, min(int(cfg.shuffle_buffer), n_local))
  proc_seed = tf.constant([int(seed), int(process_index)], tf.int64)

  @tf.autograph.experimental.do_not_convert
  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(proc_seed, e)
    shuffle_seed = tf.random.stateless_uniform([], epoch_seed, minval=None, maxval=None,
                                               dtype=tf.int64)
    ds = base.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).enumerate()
    return ds.map(tf.autograph.experimental.do_not_convert(
        lambda i, ex: (tf.random.experimental.stateless_fold_in(epoch_seed, i), ex,
                       e * n_local + i)))

  start_epoch, offset = divmod(int(start_step) * local_batch, n_local)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  tc = transform_config(cfg)
  dtype = _tf_dtype(cfg)

  skip = bool(cfg.get('skip_undecodable', False))

  @tf.autograph.experimental.do_not_convert   # plain graph code: skip autograph (faster trace)
  def augment(example_seed, ex, position):
    image = transforms.train_transform(ex['image'], example_seed, tc)
    out = {'image': tf.cast(image, dtype), 'label': tf.cast(ex['label'], tf.int32)}
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


def create_eval_dataset(cfg, local_batch: int, num_batches: int, *, process_index: int = 0,
                        process_count: int = 1) -> tf.data.Dataset:
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

  skip = bool(cfg.get('skip_undecodable', False))

  @tf.autograph.experimental.do_not_convert
  def prepare(position, ex):
    image = transforms.eval_transform(ex['image'], tc)
    out = {'image': tf.cast(image, dtype), 'label': tf.cast(ex['label'], tf.int32),
           'mask': tf.constant(1.0, tf.float32)}
    return dict(out, position=position) if skip else out

  ds = ds.enumerate().map(prepare, num_parallel_calls=_autotune(cfg.num_parallel_calls))
  padding = {'image': tf.zeros([size, size, 3], dtype), 'label': tf.constant(0, tf.int32),
             'mask': tf.constant(0.0, tf.float32)}
  if skip:
    ds = ds.ignore_errors()
    padding['position'] = tf.constant(-1, tf.int64)
  pad = tf.data.Dataset.from_tensors(padding).repeat()
  ds = ds.concatenate(pad).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(_autotune(cfg.prefetch)).with_options(_options(cfg))


# ----------------------------------------------------------------------------- global arrays

def _batch_sharding(sharding, ndim: int):
  """`sharding` restricted to the batch dimension, for arrays of any rank."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) or (None,)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))
  return sharding


def to_global_arrays(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded over the batch dimension."""
  return {k: jax.make_array_from_process_local_data(_batch_sharding(sharding, np.ndim(v)), v)
          for k, v in local_batch.items()}


def _device_iterator(local_iter, sharding, prefetch: int) -> Iterator[dict[str, Any]]:
  """Puts `prefetch` batches on device ahead of the consumer (sharding None: numpy out)."""
  if sharding is None:
    yield from local_iter
    return
  queue = collections.deque()
  for batch in local_iter:
    queue.append(to_global_arrays(batch, sharding))
    if len(queue) > max(0, int(prefetch)):
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def create_train_iterator(cfg, global_batch_size: int, sharding, seed: int, start_step: int = 0,
                          *, process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, Any]]:
  """Infinite iterator of {'image': f32 (B, R, R, 3), 'label': int32 (B,)} global jax.Arrays
  sharded like `sharding` (batch dim first; None: this process's numpy batches).

  Resumes exactly at `start_step`. process_index/count default to JAX's (override to simulate
  hosts; the arrays then hold this simulated process's part only).
  """
  pi, pc = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, pc)
  ds = create_train_dataset(cfg, local, seed, start_step, process_index=pi, process_count=pc)
  batches = data_sources.checked_batches(
      ds, get_source(cfg), cfg.train_split, pi, pc, drop_remainder=True, decode=_decoder(cfg),
      skip=bool(cfg.get('skip_undecodable', False)), first_position=int(start_step) * local)
  return _device_iterator(batches, sharding, cfg.device_prefetch)


def create_eval_iterator(cfg, global_batch_size: int, sharding, *, process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, Any]]:
  """Finite iterator of {'image', 'label', 'mask'} global batches covering the eval split
  exactly once; padding has mask 0; every process yields num_eval_batches() batches."""
  pi, pc = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, pc)
  n_batches = num_eval_batches(cfg, global_batch_size, process_count=pc)
  ds = create_eval_dataset(cfg, local, n_batches, process_index=pi, process_count=pc)
  src = get_source(cfg)
  split = _eval_split(cfg, src)
  real = int(src.read(split, pi, pc, drop_remainder=False).cardinality())   # -2: unknown
  batches = data_sources.checked_batches(
      ds, src, split, pi, pc, drop_remainder=False, decode=_decoder(cfg),
      skip=bool(cfg.get('skip_undecodable', False)), expected=real if real >= 0 else None)
  return _device_iterator(batches, sharding, cfg.device_prefetch)
