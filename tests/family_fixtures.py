"""Helpers for the model-family tests: official-code fixtures, abstract state dicts, and the
checks every family runs (parity, round trip, bf16, training gradients)."""

import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def load(family: str, name: str) -> dict:
  """An official-code fixture: sd (state dict of numpy arrays), config, images (NHWC),
  logits, stages (NHWC list)."""
  with np.load(FIXTURES / family / f"{name}.npz") as z:
    stages = sorted((k for k in z.files if k.startswith("stage")), key=lambda k: int(k[5:]))
    return dict(
        sd={k[3:]: z[k] for k in z.files if k.startswith("sd/")},
        config=json.loads(str(z["config"])),
        images=z["input_nchw"].transpose(0, 2, 3, 1),
        logits=z["logits"],
        stages=[z[k].transpose(0, 2, 3, 1) for k in stages],
    )


def abstract_state_dict(abstract, torch_key, leaf_layout) -> dict:
  """{key: zero-strided array of the PyTorch shape} for abstract Flax variables (no memory)."""
  sd = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    shape = (
        leaf_layout(path, len(leaf.shape))
        .to_torch(np.broadcast_to(np.float32(0), leaf.shape))
        .shape
    )
    sd[torch_key(path)] = np.broadcast_to(np.float32(0), shape)
  return sd


def save_pth(path, sd: dict, wrap: str):
  """torch.save of `sd` as a released file would hold it: 'plain', 'model', 'state_dict' or
  'module' (DataParallel prefixes in a {'model': ...} training state)."""
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  obj = {
      "plain": tensors,
      "model": {"model": tensors, "epoch": 3},
      "state_dict": {"state_dict": tensors},
      "module": {
          "model": {f"module.{k}": v for k, v in tensors.items()},
          "optimizer": {"state": {}, "param_groups": []},
      },
  }[wrap]
  torch.save(obj, path)


def fake_yacs_cfgnode():
  """(yacs, yacs.config, CfgNode): modules and a class that pickles exactly like
  yacs.config.CfgNode (yacs need not be installed)."""
  yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

  class CfgNode(dict):

    def __init__(self, init_dict=None):
      super().__init__(init_dict or {})
      self.__dict__["__immutable__"] = False
      self.__dict__["__deprecated_keys__"] = set()

  CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
  config.CfgNode, yacs.config = CfgNode, config
  return yacs, config, CfgNode


def save_training_checkpoint(path, sd: dict, model_cfg: dict, monkeypatch):
  """torch.save of a checkpoint as the Swin-derived trainers of Strip-MLP and MS-MLP save it:
  {'model': sd (torch tensors), 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch',
  'config': a yacs CfgNode whose MODEL node is `model_cfg`}; yacs is hidden again after."""
  yacs, config, cfg_node = fake_yacs_cfgnode()
  node = lambda d: cfg_node({k: node(v) if isinstance(v, dict) else v for k, v in d.items()})
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "yacs", yacs)
    m.setitem(sys.modules, "yacs.config", config)
    cfg = node({"MODEL": model_cfg, "TRAIN": {"BASE_LR": 5e-4, "EPOCHS": 300}})
    params = [torch.nn.Parameter(v.clone()) for v in list(sd.values())[:3]]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    torch.save(
        {
            "model": sd,
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
            "max_accuracy": 81.2,
            "epoch": 299,
            "config": cfg,
        },
        path,
    )
  assert "yacs" not in sys.modules


def _logits_and_stages(module, x):
  return module(x), module.stage_features(x)


def parity_errors(model, variables, ref) -> list:
  """Relative errors of the logits, then of each stage output, against an official fixture
  (float32, highest matmul/conv precision)."""
  with jax.default_matmul_precision("highest"):
    logits, stages = jax.jit(lambda v, x: model.apply(v, x, method=_logits_and_stages))(
        variables, ref["images"]
    )
  errors = [rel_err(logits, ref["logits"])]
  return errors + [rel_err(s, r) for s, r in zip(stages, ref["stages"], strict=True)]


def assert_same_state_dict(back: dict, sd: dict):
  """`back` (from variables_to_state_dict) holds exactly `sd`, as float32 C arrays."""
  assert back and set(back) == set(sd)
  for k, v in back.items():
    assert v.dtype == np.float32 and v.flags.c_contiguous, k
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def assert_bf16_logits_close(model, variables, ref):
  """bfloat16 compute of an official fixture: float32 logits, finite, within 5%."""
  logits = jax.jit(model.apply)(variables, ref["images"])
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert rel_err(logits, ref["logits"]) < 0.05


def train_grads(model, params, x):
  """Gradients of sum(outputs^2) in training mode (drop path on); asserts they are finite."""

  def loss(params):
    out = model.apply({"params": params}, x, train=True, rngs={"drop_path": jax.random.PRNGKey(1)})
    return jnp.sum(out**2)

  grads = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  return grads
