"""Shared by the data tests (tests/test_data_*.py): real files written here, no mocks.

An ImageFolder of JPEGs (+1 PNG) and a TFDS dataset built locally. Every generated image has
one uniform colour encoding a unique id (20 + 40 * base-6 digits), so ids, and through them
labels, survive decoding, cropping, flipping and resizing.
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from strip_mlp.data import config as data_config

CLASSES = ("ant", "bee", "cat")  # sorted -> labels 0, 1, 2
TRAIN_PER_CLASS = (5, 5, 5)  # 15 train images
VAL_PER_CLASS = (3, 4, 2)  # 9 val images (odd: padding needed)
SIZES = ((40, 56), (64, 48), (37, 90), (50, 50), (45, 70))


def id_to_rgb(i: int) -> tuple[int, int, int]:
  return (20 + 40 * (i % 6), 20 + 40 * ((i // 6) % 6), 20 + 40 * (i // 36))


def rgb_to_id(rgb) -> np.ndarray:
  """(..., 3) colours in 0..255 -> ids (nearest code)."""
  d = np.clip(np.round((np.asarray(rgb, np.float64) - 20.0) / 40.0), 0, 5).astype(int)
  return d[..., 0] + 6 * d[..., 1] + 36 * d[..., 2]


def image_ids(images, mean, std) -> np.ndarray:
  """Normalised (B, R, R, 3) batch of uniform images -> ids (B,), from the centre pixel."""
  images = np.asarray(images, np.float32)
  r = images.shape[1] // 2
  rgb = (images[:, r, r, :] * np.asarray(std) + np.asarray(mean)) * 255.0
  return rgb_to_id(rgb)


def write_image_folder(root: str) -> dict[int, int]:
  """root/{train,val}/<class>/*.JPEG (one .png); returns {id: label}."""
  labels, next_id = {}, 0
  for split, counts in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
    for label, (cls, count) in enumerate(zip(CLASSES, counts)):
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for k in range(count):
        h, w = SIZES[(next_id + label) % len(SIZES)]
        image = np.broadcast_to(np.array(id_to_rgb(next_id), np.uint8), (h, w, 3))
        if split == "train" and cls == "bee" and k == 0:
          data, ext = tf.io.encode_png(image).numpy(), "png"
        else:
          data, ext = tf.io.encode_jpeg(image, quality=95).numpy(), "JPEG"
        with open(os.path.join(root, split, cls, f"img_{next_id:04d}.{ext}"), "wb") as f:
          f.write(data)
        labels[next_id] = label
        next_id += 1
  return labels


class TinyIds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """8x8 PNG images whose red/green channels hold the example id; label = id % 3."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)
  TRAIN_IDS = tuple(range(22))
  TEST_IDS = tuple(range(100, 113))

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {
        "train": self._generate_examples(self.TRAIN_IDS),
        "test": self._generate_examples(self.TEST_IDS),
    }

  def _generate_examples(self, ids):
    for i in ids:
      image = np.zeros((8, 8, 3), np.uint8)
      image[..., 0], image[..., 1] = i % 256, i // 256
      yield i, {"image": image, "label": i % 3}


def write_tiny_tfds(data_dir: str) -> None:
  TinyIds(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
  )


def tiny_ids(images) -> np.ndarray:
  """Batch read with mean 0 / std 1 -> ids (B,)."""
  x = np.round(np.asarray(images, np.float32)[:, 0, 0, :] * 255.0).astype(int)
  return x[:, 0] + 256 * x[:, 1]


# ----------------------------------------------------------------------------- fixtures

NO_AUG = dict(hflip_prob=0.0, randaugment="", random_erasing_prob=0.0)
ID_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def make_cfg(**overrides):
  cfg = data_config.default_data_config()
  cfg.update(overrides)
  return cfg


def folder_cfg(root, **kw):
  return make_cfg(source="folder", folder_root=root, image_size=40, **kw)


def tfds_cfg(data_dir, **kw):
  # 8 px ids must survive: no crop, no flip, identity normalisation.
  return make_cfg(
      source="tfds",
      name="tiny_ids",
      data_dir=data_dir,
      image_size=8,
      random_resized_crop=False,
      small_image_padding=0,
      **NO_AUG,
      **ID_NORM,
      **kw,
  )


def batch_ids(source, batch, cfg):
  if source == "tfds":
    return tiny_ids(batch["image"])
  return image_ids(batch["image"], cfg.mean, cfg.std)


# ----------------------------------------------------------------------------- tf images


def seed(*s):
  return tf.constant(s if len(s) == 2 else (s[0], 0), tf.int64)


def ramp_image(h=24, w=32):
  y, x = np.mgrid[:h, :w]
  return np.stack([x * 7 % 256, y * 9 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)
