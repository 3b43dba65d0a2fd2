"""Fine-tuning (strip_mlp/train/finetune.py): fitting pretrained weights to the model
being fine-tuned. Reading and writing converted directories is tested with the converter
(tests/test_convert.py) and reading any path with evaluation (tests/test_evaluate.py)."""

import jax
import numpy as np
import pytest

import train_test_utils
from strip_mlp.train import finetune
from strip_mlp.runtime import sharding
from strip_mlp.train.build import build
from strip_mlp.errors import CheckpointMismatchError


def test_merge_pretrained_reinitialises_only_the_head():
  target = {
      "params": {
          "head": {"kernel": np.zeros((8, 5)), "bias": np.zeros(5)},
          "stem": {"kernel": np.zeros((3, 8))},
      },
      "batch_stats": {"norm": {"mean": np.zeros(8)}},
  }
  pre = {
      "params": {
          "head": {"kernel": np.ones((8, 100)), "bias": np.ones(100)},
          "stem": {"kernel": np.full((3, 8), 2.0)},
      },
      "batch_stats": {"norm": {"mean": np.full(8, 3.0)}},
  }
  merged, reinit = finetune.merge_pretrained(target, pre)
  assert sorted(reinit) == ["params/head/bias", "params/head/kernel"]
  np.testing.assert_array_equal(merged["params"]["stem"]["kernel"], 2.0)
  np.testing.assert_array_equal(merged["batch_stats"]["norm"]["mean"], 3.0)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], 0.0)
  pre["params"]["stem"]["kernel"] = np.ones((3, 9))
  with pytest.raises(CheckpointMismatchError, match="stem/kernel.*only the number of classes"):
    finetune.merge_pretrained(target, pre)


def test_pretrained_of_another_architecture_is_refused(fixtures_dir):
  config = train_test_utils.small_config(init_from=str(fixtures_dir / "smlp_e40_i32_l1121_c10.pth"))
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  target = build(config, train_test_utils.dataset_info(10), mesh).abstract_state  # 16 wide
  target = {"params": target.params, "batch_stats": target.batch_stats}
  with pytest.raises(CheckpointMismatchError, match="use the variant, embed_dim, layers"):
    finetune.pretrained_onto(config.init_from, target)


def test_pretrained_at_another_resolution_is_resampled(fixtures_dir):
  """init_resize=interpolate: the 32-px fixture's weights fit a 64-px model (strip-length
  tensors resampled, the rest taken as they are); without it they are refused with the
  hint."""
  pth = str(fixtures_dir / "smlp_e40_i32_l1121_c10.pth")
  config = train_test_utils.small_config(
      **{
          "model.variant": "",
          "model.embed_dim": 40,
          "model.layers": (1, 1, 2, 1),
          "data.image_size": 64,
      }
  )
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  state = build(config, train_test_utils.dataset_info(10), mesh).abstract_state
  target = {"params": state.params, "batch_stats": state.batch_stats}
  with pytest.raises(CheckpointMismatchError, match="init_resize=interpolate"):
    finetune.pretrained_onto(pth, target)
  placed, reinit = finetune.pretrained_onto(pth, target, img_size=64)
  assert reinit == []  # same classes: the head is taken too
  got = jax.tree_util.tree_map(lambda x: x.shape, placed)
  assert got == jax.tree_util.tree_map(lambda x: x.shape, target)
  _, pre = finetune.load_pretrained(pth)
  np.testing.assert_array_equal(  # not tied to the strip length: unchanged
      np.asarray(placed["params"]["patch_embed"]["kernel"]), pre["params"]["patch_embed"]["kernel"]
  )
