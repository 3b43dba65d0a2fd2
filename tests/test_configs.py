"""Every training config in configs/ loads without TensorFlow and has configs/default.py's keys.

Loading a config (train.py/eval.py's --config, before any flag is checked) must stay cheap:
it imports strip_mlp and strip_mlp.data.config only, never TensorFlow or TFDS. All config files
build on configs/common.base_config(), so all have the same (flattened) key set.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import train_test_utils  # noqa: E402

from strip_mlp.train import build as build_lib  # noqa: E402
from strip_mlp.train import plan as plan_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(REPO, "configs"))
    if f.endswith(".py") and f not in ("__init__.py", "common.py")
)

# Runs in a fresh interpreter: prints {config name: sorted flattened keys} as JSON.
LOAD_ALL = """
import importlib, json, sys
import strip_mlp
assert "tensorflow" not in sys.modules, "import strip_mlp imported tensorflow"

def keys(c, prefix=""):
  out = []
  for k, v in c.items():
    out += keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
  return out

loaded = {name: sorted(keys(importlib.import_module("configs." + name).get_config()))
          for name in sys.argv[1:]}
for module in ("tensorflow", "tensorflow_datasets"):
  assert module not in sys.modules, f"loading the configs imported {module}"
print(json.dumps(loaded))
"""


def test_configs_load_without_tensorflow_and_share_default_keys():
  assert len(CONFIGS) >= 8 and "default" in CONFIGS
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-c", LOAD_ALL, *CONFIGS],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(loaded) == CONFIGS
  default = set(loaded["default"])
  assert {"data.source", "data.image_size", "model.variant", "lr.base"} <= default
  for name, keys in loaded.items():
    assert set(keys) == default, (name, set(keys) ^ default)


# ----------------------------------------------------------------------------- family recipes

IMAGENET = dict(num_classes=1000, num_train=1_281_167, num_eval=50_000, name="imagenet2012")


@pytest.mark.parametrize(
    "family,variants",
    [("poolformer", "s12 s24 s36 m36 m48"), ("raftmlp", "s m l"), ("msmlp", "t s b")],
)
def test_family_recipes_validate_for_every_variant(family, variants):
  module = importlib.import_module(f"configs.{family}")
  for variant in variants.split():
    c = module.get_config(variant)
    assert c.model.name == f"{family}_{variant}"
    plan_lib.validate_config(c, num_devices=8, num_processes=1)
  with pytest.raises(ValueError, match=f"configs/{family}.py:"):
    module.get_config("xl")


def test_family_recipes_resolve_to_their_papers_numbers():
  from configs import msmlp, poolformer, raftmlp  # pylint: disable=g-import-not-at-top

  info = train_test_utils.dataset_info(**IMAGENET)
  spe = IMAGENET["num_train"] / 1024
  pf = plan_lib.make_plan(poolformer.get_config("m36"), info)
  assert (pf.base_lr, pf.warmup_lr, pf.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
  assert pf.total_steps == math.ceil(310 * spe) and pf.cooldown_steps == round(10 * spe)
  assert poolformer.get_config("m36").model.drop_path_rate == 0.3
  assert int(224 * poolformer.get_config("s12").data.eval_resize_ratio) == 248  # crop 0.9
  pf_sched = build_lib.build_schedule(poolformer.get_config("m36"), pf)
  first_epochs = [float(pf_sched(i)) for i in (0, int(spe) - 1, int(spe) + 1, int(2 * spe) - 1)]
  # The per-epoch staircase (5e-5 off timm's epoch units: the warmup is whole steps here).
  assert first_epochs == pytest.approx([1e-6, 1e-6, 2.008e-4, 2.008e-4], rel=1e-4)

  ms = plan_lib.make_plan(msmlp.get_config("b"), info)
  assert (ms.base_lr, ms.warmup_lr, ms.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))  # x2
  assert ms.warmup_steps == round(20 * spe) and ms.cooldown_steps == 0
  msb = msmlp.get_config("b")
  assert (msb.grad_accum_steps, msb.group_size) == (2, 64)  # README: 8 GPUs x 64, 2 steps
  assert msmlp.get_config("t").grad_accum_steps == 1

  rc = raftmlp.get_config("s")
  assert (rc.group_size, rc.data.cutmix_alpha) == (0, 0.8)  # one draw per batch; its alpha
  rp = plan_lib.make_plan(rc, info)
  assert (rp.base_lr, rp.warmup_lr, rp.min_lr) == pytest.approx((2e-3, 0.0, 1e-5))
  assert rp.total_steps == math.ceil(305 * IMAGENET["num_train"] / 2048)
  schedule = build_lib.build_schedule(rc, rp)
  end_of_warmup = rp.warmup_steps
  assert float(schedule(end_of_warmup)) == pytest.approx(2e-3)  # cosine starts after warmup
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  tx = build_lib.build_optimizer(rc, optax.constant_schedule(1.0))
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  assert float(jnp.abs(updates["bias"]).max()) > 0  # RaftMLP decays biases too


def test_raftmlp_recipe_crops_like_its_trainer():
  from configs import raftmlp  # pylint: disable=g-import-not-at-top
  from strip_mlp.data import pipeline  # pylint: disable=g-import-not-at-top

  tc = pipeline.transform_config(raftmlp.get_config("s").data)
  assert tc.resize_random_crop and tc.interpolation == "bilinear"
  assert int(tc.image_size * tc.eval_resize_ratio) == 256  # Resize(256) + RandomCrop(224)


def _event_steps(plan, every: float) -> list:
  """The steps at which train_lib's loop evaluates (every=plan.eval_every) or saves
  (plan.checkpoint_every) in an uninterrupted run: each interval, and the last step."""
  from strip_mlp.train.train_helpers import is_time  # pylint: disable=g-import-not-at-top

  last = plan.total_steps
  return [s for s in range(1, last + 1) if is_time(s, every) or s == last]


def test_demo_evaluates_and_saves_once_at_its_end():
  """15 epochs of 1,438 digits in batches of 64 are 338 steps; every 5 epochs (112.3 steps)
  falls on steps 113, 225 and 338, not on 336 and then 338 again."""
  from configs import default  # pylint: disable=g-import-not-at-top

  info = train_test_utils.dataset_info(num_classes=10, num_train=1438, num_eval=359)
  plan = plan_lib.make_plan(default.get_config(), info)
  assert plan.total_steps == 338
  assert _event_steps(plan, plan.eval_every) == [113, 225, 338]
  assert _event_steps(plan, plan.checkpoint_every) == [113, 225, 338]


def test_epoch_intervals_fall_on_the_first_step_of_each_multiple():
  info = train_test_utils.dataset_info(**IMAGENET)  # 1251.1 steps per epoch at batch 1024
  config = importlib.import_module("configs.common").base_config()
  config.num_epochs, config.eval_every_epochs, config.checkpoint_every_epochs = 300, 1, 20
  plan = plan_lib.make_plan(config, info)
  evals = _event_steps(plan, plan.eval_every)
  assert len(evals) == 300 and evals[:2] == [1252, 2503] and evals[-1] == plan.total_steps
  saves = _event_steps(plan, plan.checkpoint_every)
  assert len(saves) == 15 and saves[-1] == plan.total_steps
  config.eval_every_steps, config.num_steps, config.warmup_epochs = 20, 70, 0.0  # in steps
  plan = plan_lib.make_plan(config, info)
  assert _event_steps(plan, plan.eval_every) == [20, 40, 60, 70]
