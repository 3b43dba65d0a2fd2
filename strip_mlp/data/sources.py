"""Where examples come from: TFDS builders, ImageNet-style folders, the embedded digits set.

A source answers `num_classes`, `num_examples(split)` and `read(split, process_index,
process_count, drop_remainder)`, a tf.data.Dataset of this process's disjoint part of the
split with elements {'image': encoded bytes (scalar tf.string) or uint8 (H, W, 3),
'label': int32 ()}, in a fixed order. Shuffling and transforms happen downstream.

`python -m strip_mlp.data.sources cifar10 --data_dir=/data/tfds` prepares a TFDS dataset
(`tfds build` needs apache-beam on top).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator, Protocol

import numpy as np

import tensorflow as tf
import tensorflow_datasets as tfds

from strip_mlp.data.config import EVAL_SPLITS, default_tfds_dir
from strip_mlp.errors import (
    DatasetNotFoundError,
    EmptyClassFolderError,  # noqa: F401
    UndecodableImageError,
    UserError,
)  # (the data errors, here too)

# torchvision's IMG_EXTENSIONS (matched case-insensitively).


class Source(Protocol):
  name: str
  num_classes: int

  def num_examples(self, split: str) -> int:
    ...

  def default_eval_split(self) -> str:
    ...

  def read(
      self, split: str, process_index: int, process_count: int, drop_remainder: bool
  ) -> tf.data.Dataset:
    ...


# ----------------------------------------------------------------------------- TFDS


def _prepare_command(base: str, data_dir: str, manual_dir: str | None = None) -> str:
  manual = f" --manual_dir={manual_dir}" if manual_dir else ""
  return (
      f"`python -m strip_mlp.data.sources {base} --data_dir={data_dir}{manual}` (or "
      f"`tfds build {base} --data_dir={data_dir}{manual}`, which also needs apache-beam)"
  )


def _not_prepared_message(
    name: str, data_dir: str, manual_dir: str | None, builder: tfds.core.DatasetBuilder
) -> str:
  manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
  base = name.split(":")[0].split("/")[0]
  if base == "imagenet2012":
    return (
        f"TFDS dataset 'imagenet2012' is not prepared in data_dir={data_dir}. Download "
        f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (https://image-net.org/"
        f"download-images, registration needed) into manual_dir={manual_dir}, then run "
        f"{_prepare_command(base, data_dir, manual_dir)} "
        f"(or set data.prepare=True and data.manual_dir)."
    )
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    how = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
    return (
        f"TFDS dataset {name!r} is not prepared in data_dir={data_dir}. It needs a manual "
        f"download into manual_dir={manual_dir}: {how} Then run "
        f"{_prepare_command(base, data_dir, manual_dir)} (or set data.prepare=True)."
    )
  return (
      f"TFDS dataset {name!r} is not prepared in data_dir={data_dir}. Run "
      f"{_prepare_command(base, data_dir)} on a machine with internet access and copy "
      f"{os.path.join(data_dir, base)} here, or set data.prepare=True to download it now."
  )


@contextlib.contextmanager
def held_variant_warnings():
  """Holds TFDS's "Variant folder ... has no dataset_info.json" warnings (an unprepared
  dataset's expected state); yields the held records for the caller to drop or re-emit."""
  held = []

  def hold(record: logging.LogRecord) -> bool:
    if str(record.msg).startswith("Variant folder %s has no"):
      held.append(record)
      return False
    return True

  logger = logging.getLogger("absl")
  logger.addFilter(hold)
  try:
    yield held
  finally:
    logger.removeFilter(hold)


class TfdsSource:
  """Any prepared TFDS dataset; each process reads tfds.split_for_jax_process(split)."""

  def __init__(
      self,
      builder: tfds.core.DatasetBuilder,
      image_key: str = "image",
      label_key: str = "label",
      shuffle_files_seed: int | None = None,
  ):
    self.builder = builder
    self.name = builder.name
    self.image_key, self.label_key = image_key, label_key
    self.shuffle_files_seed = shuffle_files_seed
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(
            f"{self.name} has no feature {key!r}; features: {list(features.keys())}. "
            f"Set data.image_key / data.label_key."
        )
    self._skip_decode = isinstance(features[image_key], tfds.features.Image)
    self.num_classes = int(features[label_key].num_classes)

  @classmethod
  def from_name(
      cls,
      name: str,
      data_dir: str | None = None,
      manual_dir: str | None = None,
      prepare: bool = False,
      **kw,
  ) -> "TfdsSource":
    data_dir = os.path.expanduser(data_dir) if data_dir else default_tfds_dir()
    with held_variant_warnings() as held:
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"unknown TFDS dataset {name!r}: see `tfds.list_builders()`, or use "
            f"data.source='folder' for an image folder."
        ) from e
      prepared = builder.is_prepared()
    if prepared:  # not the expected state of an unprepared dataset: show them
      for record in held:
        logging.getLogger("absl").handle(record)
    elif not prepare:
      raise DatasetNotFoundError(_not_prepared_message(name, data_dir, manual_dir, builder))
    else:
      try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
      except OSError as e:  # includes requests' ConnectionError
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        base = name.split(":")[0].split("/")[0]
        raise DatasetNotFoundError(
            f"preparing TFDS dataset {name!r} in data_dir={data_dir} failed ({why}); on a "
            f"machine without internet access, prepare it elsewhere with "
            f"{_prepare_command(base, data_dir)} and copy {os.path.join(data_dir, base)} "
            f"here"
        ) from e
    return cls(builder, **kw)

  def _split_info(self, split: str):
    try:
      return self.builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(
          f"bad split {split!r} for {self.name}: available "
          f"{sorted(self.builder.info.splits.keys())} (slices like "
          f"'train[:90%]' work too)"
      ) from e

  def num_examples(self, split: str) -> int:
    return int(self._split_info(split).num_examples)

  def default_eval_split(self) -> str:
    for cand in EVAL_SPLITS:
      if cand in self.builder.info.splits:
        return cand
    raise ValueError(
        f'{self.name} has no {"/".join(EVAL_SPLITS)} split; set data.eval_split '
        f"(available {sorted(self.builder.info.splits.keys())})"
    )

  def read(self, split, process_index, process_count, drop_remainder):
    self._split_info(split)
    sub = tfds.split_for_jax_process(
        split,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
    )
    shuffle = self.shuffle_files_seed is not None
    read_config = tfds.ReadConfig(
        shuffle_seed=self.shuffle_files_seed,
        shuffle_reshuffle_each_iteration=True,
        add_tfds_id=False,
    )
    decoders = {self.image_key: tfds.decode.SkipDecoding()} if self._skip_decode else None
    ds = self.builder.as_dataset(
        split=sub, shuffle_files=shuffle, decoders=decoders, read_config=read_config
    )
    image_key, label_key = self.image_key, self.label_key
    return ds.map(
        tf.autograph.experimental.do_not_convert(
            lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32)}
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


# ----------------------------------------------------------------------------- folders


def _log_skipped(count: int, logged: int, split: str) -> int:
  if count > logged:
    logging.getLogger("absl").warning(
        "data.skip_undecodable: skipped %d example(s) of split %r so far (images that failed to "
        "decode; counted once per epoch)",
        count,
        split,
    )
  return max(count, logged)


def checked_batches(
    ds: tf.data.Dataset,
    source: Source,
    split: str,
    process_index: int,
    process_count: int,
    drop_remainder: bool,
    decode: Callable[[tf.Tensor], tf.Tensor],
    skip: bool,
    first_position: int = 0,
    expected: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """ds's numpy batches (ds reads `split` of `source` as `read(...)` does).

  A decode failure of a folder source becomes an UndecodableImageError naming the file (found
  by decoding this process's files with `decode`). With `skip` (ds drops failed examples and
  adds 'position': each example's index in this process's stream from first_position, -1 for
  padding), the count of skipped examples (gaps in 'position', which is removed from the
  batches; `expected` real examples in all, if known) is logged whenever it grows.
  """
  iterator, seen, end, logged = ds.as_numpy_iterator(), 0, first_position, 0
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
      if not hasattr(source, "undecodable_error"):  # folders name the file; TFDS cannot
        raise
      logging.getLogger("absl").warning(
          "An image of split %r failed to decode: decoding them all to name it.", split
      )
      named = source.undecodable_error(split, process_index, process_count, drop_remainder, decode)
      if named is None:
        raise
      raise named from e
    if "position" in batch:
      positions = batch.pop("position")
      seen += int(np.sum(positions >= 0))
      end = max(end, int(positions.max()) + 1)
      logged = _log_skipped(end - first_position - seen, logged, split)
    yield batch
  if skip and expected is not None:
    _log_skipped(expected - seen, logged, split)


def main(argv=None) -> None:
  """`python -m strip_mlp.data.sources NAME --data_dir=D [--manual_dir=M]`: prepares a TFDS
  dataset (tfds build without apache-beam)."""
  import argparse

  parser = argparse.ArgumentParser(
      prog="python -m strip_mlp.data.sources",
      description="Downloads and prepares a TFDS dataset (as `tfds build`, without apache-beam).",
  )
  parser.add_argument("name", help="TFDS name, e.g. 'cifar10' or 'imagenet2012'")
  parser.add_argument(
      "--data_dir", default=None, help="default: $TFDS_DATA_DIR or " "~/tensorflow_datasets"
  )
  parser.add_argument(
      "--manual_dir", default=None, help="manual downloads (default: " "DATA_DIR/downloads/manual)"
  )
  args = parser.parse_args(argv)
  try:
    src = TfdsSource.from_name(args.name, args.data_dir, args.manual_dir, prepare=True)
  except UserError as e:
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  print(
      f"{src.name}: prepared in {src.builder.data_dir} "
      f'({", ".join(f"{k}: {v.num_examples}" for k, v in src.builder.info.splits.items())})'
  )


if __name__ == "__main__":
  main()
