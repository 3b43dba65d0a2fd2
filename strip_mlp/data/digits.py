"""The embedded default dataset: scikit-learn's handwritten digits as a real TFDS builder.

1,797 8x8 grey digits (bundled with scikit-learn, no download) upscaled bilinearly to 32x32 RGB
uint8, 10 classes, and split per class 80/20 with a fixed seed: 'train' 1,438 and 'test' 359
examples. `load_builder(data_dir)` prepares it offline into data_dir/digits/1.0.0 on first use
(< 1 s), then it reads like any TFDS dataset (`tfds.builder('digits')` works once this module
is imported).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from strip_mlp.data.config import EMBEDDED_DATASETS, default_tfds_dir
from strip_mlp.data.sources import held_variant_warnings

IMAGE_SIZE = 32
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train'|'test': (uint8 (N, 32, 32, 3), int64 (N,))}, deterministic per-class split."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn, offline

  data = load_digits()
  images = data.images.astype(np.float32) * (255.0 / 16.0)  # (1797, 8, 8), 0..16 -> 0..255
  big = tf.image.resize(images[..., None], [IMAGE_SIZE, IMAGE_SIZE], method="bilinear").numpy()
  big = np.clip(np.round(big), 0, 255).astype(np.uint8).repeat(3, axis=-1)
  labels = data.target.astype(np.int64)
  rng = np.random.RandomState(SPLIT_SEED)
  test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    test[idx[: int(round(len(idx) * TEST_FRACTION))]] = True
  return {"train": (big[~test], labels[~test]), "test": (big[test], labels[test])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits, 32x32 RGB, 10 classes; splits 'train' (1438) and 'test' (359)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn load_digits, bilinear 8->32 px, per-class 80/20, seed 0."}
  # Explicit: TFDS' own lookup of the code path needs `importlib_resources` for some installs.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Handwritten digits from scikit-learn, upscaled to 32x32 RGB.",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    arrays = digits_arrays()
    return {name: self._generate_examples(*arrays[name]) for name in ("train", "test")}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


EMBEDDED_BUILDERS = {b.name: b for b in (Digits,)}  # keys: config.EMBEDDED_DATASETS


def load_builder(name: str = "digits", data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The embedded dataset `name` as a prepared TFDS builder in data_dir (prepared if needed)."""
  if name not in EMBEDDED_DATASETS:
    raise ValueError(f"unknown embedded dataset {name!r}; available: {EMBEDDED_DATASETS}")
  data_dir = os.path.expanduser(data_dir) if data_dir else default_tfds_dir()
  with held_variant_warnings():  # "no dataset_info.json" before the first preparation
    builder = EMBEDDED_BUILDERS[name](data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP
          )
      )
  return builder
