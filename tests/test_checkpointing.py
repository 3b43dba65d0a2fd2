"""Checkpoint manager: round trip, retention, crash safety, resharding, fine-tune merging."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_test_utils  # noqa: E402

from strip_mlp import checkpointing, sharding, train_lib  # noqa: E402
from strip_mlp.checkpointing import CheckpointMismatchError, Checkpointer  # noqa: E402

train_test_utils.quiet_logs()


def _state(mesh, scale=1.0):
  """A small TrainState with an optax AdamW state, laid out on `mesh` (fsdp specs)."""
  params = {"dense": {"kernel": scale * jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128),
                      "bias": scale * jnp.ones(128)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = train_lib.TrainState(step=jnp.array(7, jnp.int32), params=params,
                               batch_stats={"bn": {"mean": jnp.zeros(4)}},
                               opt_state=tx.init(params), ema={})
  shardings = sharding.tree_shardings(state, mesh)
  return jax.device_put(state, shardings), shardings


def _abstract(state, shardings):
  return sharding.with_shardings(jax.eval_shape(lambda: state), shardings)


def test_round_trip_and_restore_on_other_device_counts(tmp_path):
  mesh8 = sharding.create_mesh(fsdp=jax.device_count())       # params split over all devices
  state, shardings = _state(mesh8)
  assert state.params["dense"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.save(7, state, {"best_top1": 0.5})
  assert not ckpt.save(7, state, {})                         # same step: skipped, no error
  ckpt.close()
  for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices()[:4], 2)):
    mesh = sharding.create_mesh(fsdp, devices)
    _, new_shardings = _state(mesh)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.latest_step() == 7
    restored, meta = ckpt.restore(7, _abstract(state, new_shardings))
    ckpt.close()
    assert meta["step"] == 7 and meta["best_top1"] == 0.5
    assert restored.params["dense"]["kernel"].sharding == new_shardings.params["dense"]["kernel"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                                       np.asarray(b)),
                           restored, state)


def test_keeps_last_k_and_the_best(tmp_path):
  state, _ = _state(sharding.create_mesh(1, jax.devices()[:1]))
  ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=True)
  top1 = {2: 0.9, 4: 0.5, 6: 0.6}                # the best (0.9) is old
  for step in range(1, 7):
    ckpt.save(step, state, {}, {"top1": top1[step]} if step in top1 else None)
    ckpt.wait()
  ckpt.close()
  assert Checkpointer(str(tmp_path), keep=2).all_steps() == [2, 5, 6]


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, jax.numpy as jnp
    sys.path.insert(0, {repo!r})
    from strip_mlp.checkpointing import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    big = {{"w": jnp.asarray(np.random.RandomState(0).randn(4096, 4096).astype(np.float32))}}
    ckpt.save(1, {{"w": jnp.ones(3)}}, {{}})
    ckpt.wait()
    ckpt.save(2, big, {{}})      # asynchronous: returns while the files are being written
    os._exit(0)                  # the process dies mid-save
""")


def test_crash_mid_save_is_never_resumed(tmp_path):
  directory = str(tmp_path / "ckpt")
  script = _CRASH_SCRIPT.format(repo=train_test_utils.REPO)
  subprocess.run([sys.executable, "-c", script, directory], check=True, timeout=120,
                 env={**os.environ, "XLA_FLAGS": ""}, capture_output=True)
  leftovers = [n for n in os.listdir(directory) if n.startswith("2")]
  assert leftovers and all("tmp" in n for n in leftovers), os.listdir(directory)
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  restored, _ = ckpt.restore(1, target)
  np.testing.assert_array_equal(restored["w"], np.ones(3))
  ckpt.close()
  assert not any(n.startswith("2") for n in os.listdir(directory))  # cleaned up on open


def test_mismatched_checkpoint_says_what_to_do(tmp_path):
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  state, shardings = _state(mesh)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(7, state, {"model": {"embed_dim": 16, "layers": [1, 1, 1, 1]}})
  ckpt.wait()
  other, other_shardings = _state(mesh)
  other = other.replace(params={"dense": {"kernel": jnp.zeros((64, 10)),
                                          "bias": jnp.zeros(10)}})
  with pytest.raises(CheckpointMismatchError, match=r"dense/kernel is \(64, 128\) in the "
                     r"checkpoint but \(64, 10\) now.*fresh --workdir"):
    ckpt.check_compatible(7, jax.eval_shape(lambda: other))
  with pytest.raises(CheckpointMismatchError, match="embed_dim 16 in the checkpoint vs 32"):
    ckpt.check_compatible(7, _abstract(state, shardings), {"embed_dim": 32, "layers": [1] * 4})
  ckpt.check_compatible(7, _abstract(state, shardings), {"embed_dim": 16, "layers": [1] * 4})
  ckpt.close()


def test_merge_pretrained_reinitialises_only_the_head():
  target = {"params": {"head": {"kernel": np.zeros((8, 5)), "bias": np.zeros(5)},
                       "stem": {"kernel": np.zeros((3, 8))}},
            "batch_stats": {"norm": {"mean": np.zeros(8)}}}
  pre = {"params": {"head": {"kernel": np.ones((8, 100)), "bias": np.ones(100)},
                    "stem": {"kernel": np.full((3, 8), 2.0)}},
         "batch_stats": {"norm": {"mean": np.full(8, 3.0)}}}
  merged, reinit = checkpointing.merge_pretrained(target, pre)
  assert sorted(reinit) == ["params/head/bias", "params/head/kernel"]
  np.testing.assert_array_equal(merged["params"]["stem"]["kernel"], 2.0)
  np.testing.assert_array_equal(merged["batch_stats"]["norm"]["mean"], 3.0)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], 0.0)
  pre["params"]["stem"]["kernel"] = np.ones((3, 9))
  with pytest.raises(CheckpointMismatchError, match="stem/kernel.*only the number of classes"):
    checkpointing.merge_pretrained(target, pre)


def test_pretrained_of_another_architecture_is_refused(fixtures_dir):
  config = train_test_utils.small_config(init_from=str(fixtures_dir /
                                                       "smlp_e40_i32_l1121_c10.pth"))
  model = train_lib.build_model(config, 10, 32)            # embed_dim 16: does not fit
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  tx = train_lib.build_optimizer(config, optax.constant_schedule(1e-3))
  target, _ = train_lib.create_train_state(config, model, tx, mesh, jax.random.key(0))
  with pytest.raises(CheckpointMismatchError, match="use the variant, embed_dim, layers"):
    train_lib.load_pretrained_variables(config.init_from, target)
