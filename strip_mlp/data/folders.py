"""ImageNet-style folders as a source: ROOT/<split>/<class>/<image>, classes from the
train split's folder names in sorted order (labels 0..K-1)."""

from __future__ import annotations

import os
from typing import Callable

import tensorflow as tf

from strip_mlp.data.config import FOLDER_EVAL_SPLITS
from strip_mlp.errors import DatasetNotFoundError, EmptyClassFolderError, UndecodableImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _list_images(directory: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames.sort()
    out.extend(
        os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
  return out


class FolderSource:
  """ImageNet-style folder: root/<split>/<class>/<image>, classes = sorted train subfolders
  (torchvision ImageFolder order). Process p reads every process_count-th file from p."""

  def __init__(self, root: str, class_split: str = "train"):
    root = os.path.expanduser(root) if root else root
    if not root or not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"image folder data.folder_root={root!r} not found: expected root/train/<class>/*.JPEG "
          f"and root/val/<class>/* (ImageNet: extract ILSVRC2012_img_train.tar per class and "
          f"sort the val images into class folders)."
      )
    self.root = root
    self.name = f"folder:{root}"
    class_dir = os.path.join(root, class_split)
    if not os.path.isdir(class_dir):
      class_dir = self._split_dir(self.default_eval_split())
    self.classes = sorted(e.name for e in os.scandir(class_dir) if e.is_dir())
    if not self.classes:
      raise DatasetNotFoundError(
          f"no class folders in {class_dir}: expected " f"{class_dir}/<class>/<image files>"
      )
    self.class_to_index = {c: i for i, c in enumerate(self.classes)}
    self.num_classes = len(self.classes)
    self._files: dict[str, tuple[list[str], list[int]]] = {}

  def _split_dir(self, split: str) -> str:
    path = os.path.join(self.root, split)
    if not os.path.isdir(path):
      have = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
      raise ValueError(f"bad split {split!r}: {path} does not exist (folders in root: {have})")
    return path

  def default_eval_split(self) -> str:
    for cand in FOLDER_EVAL_SPLITS:
      if os.path.isdir(os.path.join(self.root, cand)):
        return cand
    raise ValueError(
        f'no {"/".join(FOLDER_EVAL_SPLITS)} folder in {self.root}; set data.eval_split'
    )

  def files(self, split: str) -> tuple[list[str], list[int]]:
    """Sorted (paths, labels) of a split."""
    if split not in self._files:
      split_dir = self._split_dir(split)
      paths, labels = [], []
      for cls in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
        if cls not in self.class_to_index:
          raise ValueError(f"class folder {cls!r} in {split_dir} is not a class of the train split")
        found = _list_images(os.path.join(split_dir, cls))
        if not found:  # torchvision's ImageFolder raises too
          raise EmptyClassFolderError(
              f"class folder {os.path.join(split_dir, cls)} has no image files "
              f'({", ".join(IMAGE_EXTENSIONS)}): add images or remove the folder'
          )
        paths += found
        labels += [self.class_to_index[cls]] * len(found)
      if not paths:
        raise DatasetNotFoundError(
            f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {split_dir}/<class>/'
        )
      self._files[split] = (paths, labels)
    return self._files[split]

  def num_examples(self, split: str) -> int:
    return len(self.files(split)[0])

  def _local(self, split, process_index, process_count, drop_remainder) -> list[int]:
    """Indices into files(split) that process `process_index` reads, in order."""
    n = len(self.files(split)[0])
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = list(range(process_index, n, process_count))  # strided: every class on every host
    return local[: n // process_count] if drop_remainder else local

  def read(self, split, process_index, process_count, drop_remainder):
    paths, labels = self.files(split)
    local = self._local(split, process_index, process_count, drop_remainder)
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "path": tf.constant([paths[i] for i in local], tf.string),
            "label": tf.constant([labels[i] for i in local], tf.int32),
        }
    )
    return ds.map(
        tf.autograph.experimental.do_not_convert(
            lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"]}
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )

  def undecodable_error(
      self,
      split,
      process_index,
      process_count,
      drop_remainder,
      decode: Callable[[tf.Tensor], tf.Tensor],
  ) -> UndecodableImageError | None:
    """The error naming the first file this process reads from `split` that `decode` (bytes ->
    image) fails on, with their count; None if all decode. Decodes them all, in parallel."""
    paths = [
        self.files(split)[0][i]
        for i in self._local(split, process_index, process_count, drop_remainder)
    ]
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).enumerate()
    ds = ds.map(
        tf.autograph.experimental.do_not_convert(
            lambda i, path: (i, tf.reduce_max(decode(tf.io.read_file(path))))
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    ok = {int(i) for i, _ in ds.as_numpy_iterator()}
    bad = [p for i, p in enumerate(paths) if i not in ok]
    if not bad:
      return None
    return UndecodableImageError(
        f"{len(bad)} of {len(paths)} image files of split {split!r} in {self.root} cannot be "
        f"decoded (first: {bad[0]}): replace or remove them, or set "
        f"data.skip_undecodable=True to skip them"
    )


# ----------------------------------------------------------------------------- decode failures
