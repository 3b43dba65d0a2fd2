"""Input pipeline (strip_mlp.data.pipeline): dataset info, per-host train/eval iterators, global
arrays, on an ImageFolder and a TFDS dataset written here (tests/data_test_utils.py). No mocks.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_test_utils import batch_ids, folder_cfg, image_ids, tfds_cfg  # noqa: E402

from strip_mlp.data import pipeline as ip  # noqa: E402

# ----------------------------------------------------------------------------- folder source


def test_folder_info_and_train_batch_shapes_dtypes_ranges(folder):
  root, _ = folder
  cfg = folder_cfg(root, random_erasing_prob=0.0)  # RRC + flip + RandAugment, 40 px
  info = ip.get_dataset_info(cfg)
  assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (3, 15, 9, 40)
  assert info["eval_split"] == "val"
  batch = next(ip.create_train_iterator(cfg, 6, None, seed=0))
  assert batch["image"].shape == (6, 40, 40, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert set(batch["label"].tolist()) <= {0, 1, 2}
  lo = (0.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  hi = (1.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  assert np.all(batch["image"] >= lo - 1e-5) and np.all(batch["image"] <= hi + 1e-5)
  assert batch["image"].std() > 0.1


def test_folder_labels_follow_class_folders(folder):
  root, labels = folder
  # Eval transform over both splits (the train split contains a PNG among the JPEGs).
  for split in ("train", "val"):
    cfg = folder_cfg(root, eval_split=split)
    seen = []
    for batch in ip.create_eval_iterator(cfg, 4, None):
      keep = batch["mask"] > 0
      ids = image_ids(batch["image"], cfg.mean, cfg.std)[keep]
      assert [labels[i] for i in ids] == batch["label"][keep].tolist()
      seen += ids.tolist()
    assert len(seen) == (15 if split == "train" else 9)
  # Train transform (random resized crop + flip keep the uniform colour).
  cfg = folder_cfg(root, randaugment="", random_erasing_prob=0.0)
  batch = next(ip.create_train_iterator(cfg, 15, None, seed=1))
  ids = image_ids(batch["image"], cfg.mean, cfg.std)
  assert sorted(ids.tolist()) == list(range(15))  # one epoch: every train image once
  assert [labels[i] for i in ids] == batch["label"].tolist()


# ----------------------------------------------------------------------------- per-host splits


@pytest.mark.parametrize("source_cfg", ["folder", "tfds"], indirect=True)
@pytest.mark.parametrize("process_count", [2, 4])
def test_train_splits_disjoint_and_complete(source_cfg, process_count):
  source, cfg, train, _ = source_cfg
  n_local = len(train) // process_count
  parts = []
  for p in range(process_count):
    it = ip.create_train_iterator(
        cfg, process_count, None, seed=0, process_index=p, process_count=process_count
    )  # local batch 1
    ids = [int(batch_ids(source, next(it), cfg)[0]) for _ in range(2 * n_local)]
    epoch0, epoch1 = ids[:n_local], ids[n_local:]
    assert len(set(epoch0)) == n_local and set(epoch1) == set(epoch0)  # each epoch: a permutation
    parts.append(set(epoch0))
  union = set().union(*parts)
  assert sum(len(s) for s in parts) == len(union) == n_local * process_count  # disjoint
  assert union <= set(train) and len(train) - len(union) < process_count  # complete


@pytest.mark.parametrize("source_cfg", ["folder", "tfds"], indirect=True)
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_sees_every_example_once_with_masked_padding(source_cfg, process_count):
  source, cfg, _, evals = source_cfg
  global_batch = 4
  n_batches = ip.num_eval_batches(cfg, global_batch, process_count=process_count)
  local = global_batch // process_count
  assert n_batches == -(-(-(-len(evals) // process_count)) // local)
  seen, padded = [], 0
  for p in range(process_count):
    batches = list(
        ip.create_eval_iterator(
            cfg, global_batch, None, process_index=p, process_count=process_count
        )
    )
    assert len(batches) == n_batches  # same count on every process
    for b in batches:
      assert b["image"].shape[0] == local and b["mask"].dtype == np.float32
      keep = b["mask"] == 1.0
      ids = batch_ids(source, b, cfg)[keep]
      assert [evals[i] for i in ids] == b["label"][keep].tolist()
      seen += ids.tolist()
      assert np.all(b["image"][~keep] == 0) and np.all(b["mask"][~keep] == 0)
      padded += int((~keep).sum())
  assert sorted(seen) == sorted(evals)  # each example exactly once
  assert padded == n_batches * global_batch - len(evals)


# ----------------------------------------------------------------------------- determinism


def test_augmentation_deterministic_for_seed_and_resumable(folder):
  root, _ = folder
  cfg = folder_cfg(root, random_erasing_prob=1.0)  # full recipe, erasing always on

  def take(n, **kw):
    it = ip.create_train_iterator(cfg, 4, None, **kw)
    return [next(it) for _ in range(n)]

  a, b = take(5, seed=3), take(5, seed=3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other = take(1, seed=4)[0]
  assert not np.array_equal(other["image"], a[0]["image"])
  # 15 images, batch 4: step 3 straddles the epoch boundary; resuming reproduces it exactly.
  resumed = take(2, seed=3, start_step=3)
  for x, y in zip(resumed, a[3:]):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ----------------------------------------------------------------------------- global arrays


def test_batches_are_global_arrays_sharded_over_data_axis(tiny_tfds_dir):
  assert tf.config.get_visible_devices("GPU") == []  # TF never holds accelerator memory
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cfg = tfds_cfg(tiny_tfds_dir)
  batch = next(ip.create_train_iterator(cfg, 8, sharding, seed=0))
  evals = list(ip.create_eval_iterator(cfg, 8, sharding))
  assert len(evals) == ip.num_eval_batches(cfg, 8) == 2
  for b in (batch, evals[-1]):
    assert isinstance(b["image"], jax.Array) and b["image"].shape == (8, 8, 8, 3)
    for key, value in b.items():
      assert value.shape[0] == 8
      assert value.sharding.is_equivalent_to(
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), value.ndim
      )
      assert len(value.addressable_shards) == len(devices)
      assert value.addressable_shards[0].data.shape[0] == 8 // len(devices)
  assert float(jax.numpy.sum(evals[-1]["mask"])) == 13 - 8
