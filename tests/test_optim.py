"""Optimizer, schedule, weight-decay mask and gradient accumulation of the training recipe."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_test_utils  # noqa: E402

from strip_mlp.train import optim  # noqa: E402
from strip_mlp.runtime import sharding  # noqa: E402
from strip_mlp.train.build import build  # noqa: E402


def timm_cosine_lr(t, base, warmup_lr, min_lr, total, warmup, warmup_prefix=False):
  """timm CosineLRScheduler._get_lr (one cycle, t_in_epochs=False), written out."""
  if t < warmup:
    return warmup_lr + t * (base - warmup_lr) / warmup
  if warmup_prefix:
    t, total = t - warmup, total - warmup
  return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("warmup_prefix", [False, True])
def test_schedule_is_timm_warmup_cosine(warmup_prefix):
  base, wlr, mlr, total, warm = 1.7e-3, 1.7e-6, 1.7e-5, 1000, 66
  sched = optim.warmup_cosine_schedule(base, wlr, mlr, total, warm, warmup_prefix)
  steps = np.array([0, 1, 33, 65, 66, 67, 500, 998, 999])
  got = np.asarray(jax.vmap(sched)(steps))
  want = [timm_cosine_lr(int(t), base, wlr, mlr, total, warm, warmup_prefix) for t in steps]
  np.testing.assert_allclose(got, want, rtol=2e-6)
  assert got[0] == pytest.approx(wlr)
  assert np.all(np.diff(got[:4]) > 0) and np.all(np.diff(got[4:]) < 0)
  assert got[-1] == pytest.approx(mlr, rel=1e-3)


def test_schedule_rejects_warmup_longer_than_training():
  with pytest.raises(ValueError, match="warmup"):
    optim.warmup_cosine_schedule(1e-3, 0, 0, total_steps=10, warmup_steps=10)


@pytest.mark.parametrize("warmup_prefix", [False, True])
def test_cooldown_holds_min_lr_after_a_shorter_cosine(warmup_prefix):
  """timm's cooldown epochs: the cosine of a run `cooldown` steps shorter, then min_lr."""
  base, wlr, mlr, total, warm, cool = 1e-3, 1e-6, 1e-5, 310, 5, 10
  sched = optim.warmup_cosine_schedule(base, wlr, mlr, total, warm, warmup_prefix, cool)
  shorter = optim.warmup_cosine_schedule(base, wlr, mlr, total - cool, warm, warmup_prefix)
  steps = np.arange(total)
  got = np.asarray(jax.vmap(sched)(steps))
  np.testing.assert_allclose(got[:300], np.asarray(jax.vmap(shorter)(steps[:300])), rtol=1e-6)
  np.testing.assert_allclose(got[300:], mlr, rtol=1e-6)
  assert got[299] > mlr * 1.0001  # still on the cosine one step before the cooldown
  with pytest.raises(ValueError, match="cooldown"):
    optim.warmup_cosine_schedule(base, wlr, mlr, 15, 5, warmup_prefix, 10)


def test_decay_all_decays_biases_and_norms():
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}, "scale": jnp.ones(4)}
  for name, expected in (("matrices", 1), ("all", 3)):
    mask = optim.WEIGHT_DECAY_MASKS[name](params)
    assert sum(jax.tree_util.tree_leaves(mask)) == expected
    tx = optim.create_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, mask=mask)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # zero grads: only the decay moves
    moved = [bool(jnp.any(u != 0)) for u in jax.tree_util.tree_leaves(updates)]
    assert sum(moved) == expected


def test_lr_scaling_rules():
  assert optim.lr_scale_factor("linear_300", 1024) == pytest.approx(1024 / 300)
  assert optim.lr_scale_factor("linear_512", 256) == pytest.approx(0.5)
  assert optim.lr_scale_factor("sqrt_256", 1024) == pytest.approx(2.0)
  assert optim.lr_scale_factor("none", 4096) == 1.0
  with pytest.raises(ValueError, match="linear_<N>"):
    optim.lr_scale_factor("linear", 1024)


def test_weight_decay_mask_is_the_released_rule(fixtures_dir):
  """Every parameter decays unless the PyTorch tensor is 1-D or named '*.bias'."""
  from strip_mlp.convert import infer_architecture, torch_key
  from strip_mlp.models.strip_mlp import StripMLP
  from strip_mlp.convert.torch_io import read_state_dict

  sd = read_state_dict(str(fixtures_dir / "smlp_e40_i32_l1121_c10.pth"))
  model = StripMLP(**infer_architecture(sd))
  params = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
  )["params"]
  mask = optim.weight_decay_mask(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert len(flat) == len([k for k in sd if "running" not in k and "num_batches" not in k])
  kinds = set()
  for path, decays in flat:
    name = torch_key(("params",) + tuple(p.key for p in path))
    released = not (sd[name].ndim == 1 or name.endswith(".bias"))
    assert decays == released, name
    kinds.add((path[-1].key, decays))
  # The mask covers both outcomes, incl. 2-D strip biases (no decay) and GRN/pos tables.
  assert ("bias", False) in kinds and ("kernel", True) in kinds
  assert ("embeddings_table", True) in kinds and ("gamma", True) in kinds


def test_adamw_with_clipping_matches_pytorch():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(0)
  params = {"w": rng.randn(4, 3).astype(np.float32), "bias": rng.randn(3).astype(np.float32)}
  grads = [
      {k: (10 * rng.randn(*v.shape)).astype(np.float32) for k, v in params.items()}
      for _ in range(3)
  ]
  lrs = [1e-3, 2e-3, 3e-3]
  tx = optim.create_optimizer(
      lambda step: jnp.asarray(lrs)[step], weight_decay=0.05, grad_clip_norm=5.0
  )
  p, state = jax.tree_util.tree_map(jnp.asarray, params), None
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)

  tw = torch.nn.Parameter(torch.tensor(params["w"]))
  tb = torch.nn.Parameter(torch.tensor(params["bias"]))
  opt = torch.optim.AdamW(
      [{"params": [tw]}, {"params": [tb], "weight_decay": 0.0}],
      lr=lrs[0],
      betas=(0.9, 0.999),
      eps=1e-8,
      weight_decay=0.05,
  )
  for g, lr in zip(grads, lrs):
    for group in opt.param_groups:
      group["lr"] = lr
    tw.grad, tb.grad = torch.tensor(g["w"]), torch.tensor(g["bias"])
    torch.nn.utils.clip_grad_norm_([tw, tb], 5.0)
    opt.step()
  np.testing.assert_allclose(p["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(p["bias"], tb.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0])}
  out = optim.ema_update(ema, {"a": jnp.array([3.0, 4.0])}, 0.9)
  np.testing.assert_allclose(out["a"], [1.2, 2.2], rtol=1e-6)


class _Linear(nn.Module):
  """A BatchNorm-free stand-in with the model interface (micro-batches are then exact)."""

  img_size: int = 8
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_gradient_accumulation_equals_one_big_batch():
  mesh = (
      sharding.create_mesh(1, jax.devices()[:2])
      if jax.device_count() >= 2
      else sharding.create_mesh(1)
  )
  model = _Linear()
  rng = np.random.RandomState(0)
  batch = {
      "image": rng.randn(16, 8, 8, 3).astype(np.float32),
      "label": rng.randint(0, 4, 16).astype(np.int32),
  }
  results = []
  for accum in (1, 4):
    c = train_test_utils.small_config(
        grad_accum_steps=accum, grad_clip_norm=1.0, **{"data.label_smoothing": 0.1}
    )
    run = build(
        c,
        train_test_utils.dataset_info(4),
        mesh,
        model=model,
        schedule=optax.constant_schedule(0.05),
    )
    step = run.train_step
    state = run.init(jax.random.key(0))
    b = sharding.put_global(batch, sharding.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, b)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  (p1, l1), (p4, l4) = results
  assert l1 == pytest.approx(l4, rel=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4
  )


def test_ema_tracks_the_params():
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  model = _Linear()
  c = train_test_utils.small_config(ema_decay=0.75)
  run = build(
      c, train_test_utils.dataset_info(4), mesh, model=model, schedule=optax.constant_schedule(0.05)
  )
  step = run.train_step
  state = run.init(jax.random.key(0))
  before = jax.device_get(state.params)
  batch = {"image": np.ones((8, 8, 8, 3), np.float32), "label": np.zeros(8, np.int32)}
  state, _ = step(state, sharding.put_global(batch, sharding.batch_sharding(mesh)))
  after = jax.device_get(state.params)
  want = jax.tree_util.tree_map(lambda b, a: 0.75 * b + 0.25 * a, before, after)
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8),
      jax.device_get(state.ema["params"]),
      want,
  )
  assert not np.allclose(after["Dense_0"]["kernel"], before["Dense_0"]["kernel"])


def test_lr_timings():
  """'released': update i at lr(max(i - 1/k, 0)) (k = 2: the scheduler counts
  micro-batches); 'current': lr(i); 'epoch': lr at the start of i's epoch (timm stepped once
  per epoch, 2.5 updates per epoch here)."""
  sched = optim.warmup_cosine_schedule(1e-3, 1e-6, 1e-5, 20, 5)
  at = lambda timing, k=1: [float(optim.timed_schedule(sched, timing, k, 2.5)(i)) for i in range(8)]
  value = lambda t: float(sched(t))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7)
  close(at("current"), [value(i) for i in range(8)])
  close(at("released"), [value(max(i - 1, 0)) for i in range(8)])
  close(at("released", 2), [value(max(i - 0.5, 0)) for i in range(8)])
  close(at("epoch"), [value(e) for e in (0, 0, 0, 2.5, 2.5, 5, 5, 5)])
  close(at("released")[:2], [1e-6, 1e-6])  # the first two updates at the warmup lr
