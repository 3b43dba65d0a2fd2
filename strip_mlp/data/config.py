"""The data config and the names and defaults of its values, without TensorFlow.

    cfg = default_data_config()      # ml_collections.ConfigDict, every data.* key
    spec = parse_rand_augment(cfg.randaugment)

Configs, validation (strip_mlp.train.plan) and the TF modules of strip_mlp.data all take their
choices and defaults from here, so each is defined once. Importing this module imports
neither TensorFlow nor TFDS.
"""

from __future__ import annotations

import dataclasses
import os
import re

import ml_collections
from ml_collections import config_dict

SOURCES = ("tfds", "folder", "embedded")
EMBEDDED_DATASETS = ("digits",)  # names of strip_mlp.data.digits.EMBEDDED_BUILDERS
# Split names tried, in order, when data.eval_split is None (TFDS splits and folder names).
EVAL_SPLITS = ("validation", "val", "test")  # TFDS names, in order
FOLDER_EVAL_SPLITS = ("val", "validation", "test")  # ImageNet-style folders, in order
IMAGE_DTYPES = ("float32", "bfloat16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# libjpeg's JDCT_ISLOW, PIL's default; '' is TF's default (INTEGER_FAST: ~1 level off PIL's).
JPEG_DCT_METHOD = "INTEGER_ACCURATE"
JPEG_DCT_METHODS = ("INTEGER_ACCURATE", "INTEGER_FAST", "")
# Resized exactly as PIL's Image.resize (strip_mlp.data.pil_resize.FILTERS).
PIL_INTERPOLATIONS = ("bicubic", "bilinear")
# tf.image.resize methods; 'tf_bicubic' / 'tf_bilinear' name TF's version of PIL's two.
TF_INTERPOLATIONS = ("nearest", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
INTERPOLATIONS = (
    PIL_INTERPOLATIONS + TF_INTERPOLATIONS + tuple(f"tf_{m}" for m in PIL_INTERPOLATIONS)
)
ERASING_MODES = ("pixel", "rand", "const")
DEFAULT_RANDAUGMENT = "rand-m9-mstd0.5-inc1"


def default_tfds_dir() -> str:
  """TFDS data_dir when data.data_dir is None: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """global batch / process count; ValueError unless it is a positive multiple."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} must be a positive multiple of the "
        f"process count {process_count}"
    )
  return global_batch_size // process_count


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


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """Parsed timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'."""

  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  increasing: bool = False
  prob: float = 0.5


def parse_rand_augment(spec: str) -> RandAugmentSpec:
  """Parses 'rand-m9-n2-mstd0.5-inc1-p0.5' (timm syntax; m, n, mstd, inc, p)."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"randaugment must look like 'rand-m9-mstd0.5-inc1', got {spec!r}")
  kw = {}
  for part in parts[1:]:
    m = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+|inf)", part)
    if not m:
      raise ValueError(f"unknown RandAugment option {part!r} in {spec!r} (use m, n, mstd, inc, p)")
    key, val = m.groups()
    if key == "m":
      kw["magnitude"] = float(val)
    elif key == "n":
      kw["num_layers"] = int(val)
    elif key == "mstd":
      kw["magnitude_std"] = float(val)
    elif key == "inc":
      kw["increasing"] = bool(int(val))
    else:
      kw["prob"] = float(val)
  return RandAugmentSpec(**kw)


def default_data_config() -> ml_collections.ConfigDict:
  """Data config with the published recipe's augmentation; source = the embedded digits."""
  c = ml_collections.ConfigDict()
  # --- where the data comes from
  c.source = "embedded"  # one of SOURCES
  c.name = "digits"  # TFDS name ('imagenet2012', ...) or embedded name
  c.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: default_tfds_dir())
  c.manual_dir = config_dict.placeholder(str)  # manual downloads (None: data_dir/downloads/manual)
  c.prepare = False  # tfds: download_and_prepare when missing (needs network)
  c.folder_root = config_dict.placeholder(str)  # folder: root/{train,val}/<class>/<images>
  c.train_split = "train"
  c.eval_split = config_dict.placeholder(str)  # None: the first of EVAL_SPLITS that exists
  c.image_key = "image"
  c.label_key = "label"
  c.image_size = 32  # R; the recipe uses 224
  c.num_classes = config_dict.placeholder(int)  # None: from the dataset
  c.skip_undecodable = False  # False: an image that fails to decode stops the run with
  # its path; True: skip such images, counted in the log
  # --- throughput
  c.shuffle_buffer = 16_384  # examples (encoded) per process; capped at the split size
  c.cache = False  # cache the (encoded) local split in memory
  c.prefetch = 2  # tf.data batches prefetched (-1: autotune)
  c.device_prefetch = 2  # global batches put on device ahead of use
  c.num_parallel_calls = -1  # parallel decode/augment calls (-1: autotune)
  c.deterministic = True  # tf.data deterministic order
  c.image_dtype = "float32"  # IMAGE_DTYPES; 'bfloat16' halves host->device bytes
  # --- train augmentation (timm create_transform as in the official trainer)
  c.interpolation = "bicubic"  # 'bicubic' | 'bilinear': PIL's exactly (in eval);
  # 'tf_bicubic', 'area', ...: tf.image.resize
  c.train_pil_resize = False  # PIL-exact resizing in training too (~2 ms CPU/image
  # more); False: tf.image.resize there (~0.1 level off)
  c.jpeg_dct_method = JPEG_DCT_METHOD  # PIL's IDCT; '' = TF's default (fast, ~1 level off)
  c.random_resized_crop = True
  # True: resize the shorter side to int(R * eval_resize_ratio), random R x R crop (torchvision
  # Resize + RandomCrop, RaftMLP's recipe); wins over random_resized_crop
  c.resize_random_crop = False
  c.rrc_scale = (0.08, 1.0)
  c.rrc_ratio = (3 / 4, 4 / 3)
  c.small_image_size = 32  # image_size <= this: pad + random crop instead of RRC
  c.small_image_padding = 4  # 0: use random_resized_crop for small images too
  c.hflip_prob = 0.5
  c.randaugment = DEFAULT_RANDAUGMENT  # '' disables
  c.random_erasing_prob = 0.25
  c.random_erasing_mode = "pixel"  # one of ERASING_MODES
  c.random_erasing_count = 1
  # --- eval transform
  c.eval_crop = True  # resize shorter side to int(R*ratio), center crop R
  c.eval_resize_ratio = 256 / 224
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD
  # --- batch-level mixing (applied in the train step by strip_mlp.train.mixup.mixup_cutmix)
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.label_smoothing = 0.1
  return c


def config_errors(d) -> list[str]:
  """One line per `data.*` value that cannot work (no TensorFlow; plan.validate_config)."""
  errs = []

  def need(ok, msg):
    if not ok:
      errs.append(msg)

  need(d.source in SOURCES, f"data.source={d.source!r} must be one of {SOURCES}")
  if d.source == "embedded":
    need(
        d.name in EMBEDDED_DATASETS,
        f"data.name={d.name!r} is not an embedded dataset ({', '.join(EMBEDDED_DATASETS)});"
        " for a TFDS dataset set --config.data.source=tfds",
    )
  need(
      d.source != "folder" or d.folder_root,
      "data.source='folder' needs --config.data.folder_root=/path/with/train/and/val",
  )
  need(d.image_size > 0, f"data.image_size={d.image_size} must be positive")
  need(
      d.image_dtype in IMAGE_DTYPES,
      f"data.image_dtype={d.image_dtype!r} must be one of {IMAGE_DTYPES}",
  )
  need(
      d.interpolation in INTERPOLATIONS,
      f"data.interpolation={d.interpolation!r} must be one of {INTERPOLATIONS}",
  )
  need(
      d.get("jpeg_dct_method", "") in JPEG_DCT_METHODS,
      f"data.jpeg_dct_method={d.get('jpeg_dct_method')!r} must be one of {JPEG_DCT_METHODS}",
  )
  need(
      d.random_erasing_mode in ERASING_MODES,
      f"data.random_erasing_mode={d.random_erasing_mode!r} must be one of {ERASING_MODES}",
  )
  for key in ("hflip_prob", "random_erasing_prob", "mixup_prob", "mixup_switch_prob"):
    need(0 <= d[key] <= 1, f"data.{key}={d[key]} must be in [0, 1]")
  need(0 <= d.label_smoothing < 1, f"data.label_smoothing={d.label_smoothing} must be in [0, 1)")
  need(d.mixup_alpha >= 0 and d.cutmix_alpha >= 0, "data.mixup_alpha/cutmix_alpha must be >= 0")
  need(d.eval_resize_ratio > 0, f"data.eval_resize_ratio={d.eval_resize_ratio} must be positive")
  for key in ("rrc_scale", "rrc_ratio"):
    lo_hi = tuple(d[key])
    need(
        len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
        f"data.{key}={lo_hi} must be (low, high) with 0 < low <= high",
    )
  need(
      len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
      f"data.mean/std must be 3 values each (RGB), std positive; got {d.mean}/{d.std}",
  )
  if d.randaugment:
    try:
      parse_rand_augment(d.randaugment)
    except (ValueError, TypeError) as e:
      errs.append(f"data.randaugment={d.randaugment!r}: {e} ('' disables it)")
  return errs
