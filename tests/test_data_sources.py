"""Dataset sources (strip_mlp.data.sources): missing/unprepared datasets, empty class folders,
undecodable images, the prepare command. Real files written here; no mocks.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import sys  # noqa: E402

import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_test_utils import (  # noqa: E402
    NO_AUG,
    folder_cfg,
    image_ids,
    make_cfg,
    write_image_folder,
)

from strip_mlp.data import pipeline as ip  # noqa: E402
from strip_mlp.data import sources as data_sources  # noqa: E402


def test_missing_or_bad_dataset_messages(tmp_path, folder, caplog):
  empty = str(tmp_path / "empty")
  with pytest.raises(data_sources.DatasetNotFoundError) as e:
    ip.get_dataset_info(make_cfg(source="tfds", name="imagenet2012", data_dir=empty))
  msg = str(e.value)
  for part in (
      "ILSVRC2012_img_train.tar",
      "ILSVRC2012_img_val.tar",
      os.path.join(empty, "downloads", "manual"),
      "tfds build imagenet2012",
  ):
    assert part in msg
  manual = str(tmp_path / "manual")
  with pytest.raises(data_sources.DatasetNotFoundError, match=f"manual_dir={manual}"):
    ip.get_dataset_info(
        make_cfg(source="tfds", name="imagenet2012", data_dir=empty, manual_dir=manual)
    )
  with pytest.raises(data_sources.DatasetNotFoundError, match="tfds build cifar10") as e:
    ip.get_dataset_info(make_cfg(source="tfds", name="cifar10", data_dir=empty))
  assert f"python -m strip_mlp.data.sources cifar10 --data_dir={empty}" in str(e.value)
  assert "Variant folder" not in caplog.text  # TFDS's warning about the unprepared dataset
  pets = tmp_path / "pets"  # an empty class folder: an error, as in torchvision
  tf.io.write_file(str(pets / "train/cat/a.png"), tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)))
  tf.io.write_file(str(pets / "train/dog/notes.txt"), "not an image")
  with pytest.raises(
      data_sources.EmptyClassFolderError, match=str(pets / "train" / "dog") + " has no image files"
  ):
    ip.get_dataset_info(make_cfg(source="folder", folder_root=str(pets), eval_split="train"))
  with pytest.raises(ValueError, match="unknown TFDS dataset"):
    ip.get_dataset_info(make_cfg(source="tfds", name="no_such_dataset_xyz", data_dir=empty))
  with pytest.raises(data_sources.DatasetNotFoundError, match=r"root/train/<class>"):
    ip.get_dataset_info(make_cfg(source="folder", folder_root=str(tmp_path / "nope")))
  with pytest.raises(ValueError, match="unknown data.source"):
    ip.get_dataset_info(make_cfg(source="webdataset"))
  with pytest.raises(ValueError, match="bad split"):
    ip.get_dataset_info(folder_cfg(folder[0], eval_split="holdout"))
  with pytest.raises(ValueError, match="multiple of the process count"):
    ip.create_train_iterator(
        folder_cfg(folder[0]), 6, None, seed=0, process_index=0, process_count=4
    )


def test_undecodable_image_is_named_or_skipped(tmp_path, caplog):
  root = str(tmp_path)
  write_image_folder(root)  # train ids 0-14 (ant 0-4), val ids 15-23 (ant 15-17)
  bad = {s: f"{root}/{s}/ant/img_{i:04d}.JPEG" for s, i in (("train", 4), ("val", 16))}
  for path in bad.values():
    os.truncate(path, os.path.getsize(path) // 2)  # real truncated JPEGs
  cfg = folder_cfg(root, **NO_AUG)
  with pytest.raises(data_sources.UndecodableImageError) as e:
    next(ip.create_train_iterator(cfg, 15, None, seed=0))
  msg = str(e.value)
  assert isinstance(e.value, data_sources.UserError) and "\n" not in msg and bad["train"] in msg
  assert "1 of 15 image files of split 'train'" in msg and "data.skip_undecodable=True" in msg
  with pytest.raises(data_sources.UndecodableImageError, match=bad["val"]):
    list(ip.create_eval_iterator(cfg, 3, None))
  cfg.skip_undecodable = True  # one epoch = the 14 good images; eval sees 8
  batch = next(ip.create_train_iterator(cfg, 14, None, seed=0))
  ids = image_ids(batch["image"], cfg.mean, cfg.std)
  assert set(batch) == {"image", "label"} and sorted(ids) == [i for i in range(15) if i != 4]
  batches = list(ip.create_eval_iterator(cfg, 3, None))
  ids = np.concatenate([image_ids(b["image"], cfg.mean, cfg.std)[b["mask"] > 0] for b in batches])
  assert sorted(ids) == [15] + list(range(17, 24)) and len(batches) == 3
  assert all(f"skipped 1 example(s) of split '{s}'" in caplog.text for s in ("train", "val"))


def test_prepare_command_runs_as_a_module():
  proc = subprocess.run(
      [sys.executable, "-m", "strip_mlp.data.sources", "--help"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "python -m strip_mlp.data.sources" in proc.stdout and "--data_dir" in proc.stdout
