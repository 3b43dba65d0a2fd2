"""BatchNorm's running statistics (torch's rule) and ghost batch norm in the train step."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import train_test_utils as utils
from strip_mlp.runtime import sharding
from strip_mlp.models.batch_norm import BatchNorm
from strip_mlp.train.build import build
from strip_mlp.models.strip_mlp import StripMLP


def _torch_step(x_nhwc, momentum=0.1):
  bn = torch.nn.BatchNorm2d(x_nhwc.shape[-1], momentum=momentum).train()
  y = bn(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return y.detach().numpy().transpose(0, 2, 3, 1), bn.running_mean.numpy(), bn.running_var.numpy()


@pytest.mark.parametrize("shape", [(4, 5, 3, 6), (2, 1, 1, 6)])
def test_train_step_matches_torch_batchnorm2d(shape):
  x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype(np.float32)
  bn = BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  want_y, want_mean, want_var = _torch_step(x)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], want_mean, rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], want_var, rtol=1e-6)  # unbiased


def test_one_value_per_channel_stays_finite():
  """n = 1 (a batch of one 1x1 map): torch refuses; the update takes the biased variance."""
  x = jnp.full((1, 1, 1, 4), 3.0)
  bn = BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  (y, upd), grads = jax.value_and_grad(
      lambda p: (lambda o: (jnp.sum(o[0]), o))(
          bn.apply({**v, "params": p}, x, mutable=["batch_stats"])
      ),
      has_aux=True,
  )(v["params"])
  del y
  assert np.all(np.isfinite(upd[1]["batch_stats"]["var"]))
  np.testing.assert_allclose(upd[1]["batch_stats"]["var"], 0.9)  # 0.9 * 1 + 0.1 * 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def _setup(accum, image_size):
  """Batch 32 of `image_size` px for a model built at 32 px (embed 8, one block in stage 4:
  its strip layer runs on windows when the images are larger), groups of 8."""
  config = utils.small_config(
      **{"grad_accum_steps": accum, "group_size": 8, "batch_size": 32, "data.mixup_alpha": 0.8}
  )
  info = types.SimpleNamespace(
      name="x", num_classes=10, num_train=320, num_eval=32, image_size=image_size
  )
  model = StripMLP(
      embed_dim=8, layers=(0, 0, 0, 1), img_size=32, num_classes=10, drop_path_rate=0.0
  )
  rng = np.random.default_rng(1)
  batch = {
      "image": rng.normal(size=(32, image_size, image_size, 3)).astype(np.float32),
      "label": rng.integers(0, 10, 32).astype(np.int32),
  }
  return config, info, model, batch


def _by_hand(run, config, state, batch):
  """The loss and running statistics the grouped step must give, one group at a time."""
  from strip_mlp.train.mixup import mixup_cutmix  # pylint: disable=g-import-not-at-top

  @jax.jit
  def group(stats, images, labels, rng):
    mix_rng, drop_rng = jax.random.split(rng)
    images, targets = mixup_cutmix(
        mix_rng,
        images,
        labels,
        10,
        mixup_alpha=0.8,
        cutmix_alpha=config.data.cutmix_alpha,
        label_smoothing=0.1,
    )
    logits, upd = run.model.apply(
        {"params": state.params, "batch_stats": stats},
        images,
        train=True,
        rngs={"drop_path": drop_rng},
        mutable=["batch_stats"],
    )
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), upd["batch_stats"]

  k, g = config.grad_accum_steps, config.group_size
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), 0)
  stats, losses = state.batch_stats, []
  for j in range(k):
    micro = {n: a[j::k] for n, a in batch.items()}
    micro_rng = jax.random.fold_in(rng, j) if k > 1 else rng
    updates = []
    for i in range(len(micro["label"]) // g):
      part = slice(i * g, (i + 1) * g)
      loss, upd = group(
          stats, micro["image"][part], micro["label"][part], jax.random.fold_in(micro_rng, i)
      )
      losses.append(loss)
      updates.append(upd)
    stats = jax.tree_util.tree_map(lambda *u: jnp.mean(jnp.stack(u), 0), *updates)
  return float(jnp.mean(jnp.stack(losses))), stats


@pytest.mark.parametrize("accum,image_size,fsdp", [(1, 32, 1), (2, 32, 2), (1, 64, 1)])
def test_ghost_groups_are_separate_batches_on_eight_devices(accum, image_size, fsdp):
  """group_size 8 of a batch of 32 (2 micro-batches with accum 2; strip windows with 64 px
  images for the 32 px model): per group statistics and mixup draws, the mean of the
  groups' running-statistic updates, on 8 devices (groups split over devices; parameters
  split over pairs of them with fsdp 2)."""
  config, info, model, batch = _setup(accum, image_size)
  with jax.default_matmul_precision("highest"):
    run = build(config, info, sharding.create_mesh(fsdp), model=model)
    state = run.init(jax.random.key(0))
    want_loss, want_stats = _by_hand(run, config, state, batch)
    new, metrics = run.train_step(state, batch)
  assert float(metrics["loss"]) == pytest.approx(want_loss, rel=1e-5)
  for got, want in zip(
      jax.tree_util.tree_leaves(new.batch_stats), jax.tree_util.tree_leaves(want_stats)
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_group_size_must_divide_the_micro_batch():
  from strip_mlp.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from strip_mlp.train.plan import validate_config  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=r"group_size=24 must be 0 .* micro-batch .* = 32"):
    validate_config(utils.small_config(group_size=24, grad_accum_steps=2), check_devices=False)
