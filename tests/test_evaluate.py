"""Evaluation (strip_mlp/evaluation/evaluate.py, eval.py): every example counted once on 1 and 8
devices and on simulated hosts, exact agreement with a direct computation, the converted
PyTorch fixture's predictions, training-workdir checkpoints (latest/best/step, EMA/raw),
and the one-line errors.

Images come from the embedded digits test split (359 examples, a prime) through the real
input pipeline; batch sizes (48, 56) do not divide it, so the last batch is padded.
"""

import importlib.util
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_test_utils  # noqa: E402

from strip_mlp import StripMLP  # noqa: E402
from strip_mlp.checkpoints import model_checkpoint  # noqa: E402
from strip_mlp.runtime import sharding  # noqa: E402
from strip_mlp.data import config as data_config  # noqa: E402
from strip_mlp.data import pipeline  # noqa: E402
from strip_mlp.evaluation import eval_lib  # noqa: E402
from strip_mlp.evaluation import evaluate as ev  # noqa: E402
from strip_mlp.checkpoints import train_checkpoint  # noqa: E402
from strip_mlp.errors import EvalError  # noqa: E402
from strip_mlp.checkpoints.model_checkpoint import save_checkpoint  # noqa: E402
from strip_mlp.train.steps import TrainState  # noqa: E402
from strip_mlp.convert import torch_to_flax  # noqa: E402
from strip_mlp.models.strip_mlp import abstract_variables  # noqa: E402

SPLIT_SIZE = 359  # digits 'test'
FIXTURE = "smlp_e40_i32_l1121_c10"  # 32 px, 10 classes: fits the digits


def _load_eval_cli():
  spec = importlib.util.spec_from_file_location(
      "eval_cli", os.path.join(train_test_utils.REPO, "eval.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


eval_cli = _load_eval_cli()


def tiny_model():
  """One block in stage 1 only: compiles in seconds (XLA:CPU compile time dominates)."""
  return StripMLP(embed_dim=16, layers=(1, 0, 0, 0), img_size=32, num_classes=10)


def random_variables(model, seed):
  """Random {'params', 'batch_stats'} of `model` built on the host (no init compile):
  BatchNorm variances in [0.5, 1.5], scales near 1, everything else N(0, 0.1^2)."""
  rng = np.random.RandomState(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    base = 1.0 if name == "scale" else 0.0
    return (base + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, dict(abstract_variables(model)))


def mesh_of(n):
  return sharding.create_mesh(1, jax.devices()[:n])


def reference_metrics(model, variables, images, labels):
  """Direct computation over the real examples only: hits and float64 loss."""
  logits = np.asarray(
      jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images), np.float64
  )
  top5 = np.argsort(-logits, axis=1)[:, :5]
  logp = logits - logits.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  return {
      "top1_hits": int(np.sum(top5[:, 0] == labels)),
      "top5_hits": int(np.sum(np.any(top5 == labels[:, None], axis=1))),
      "loss": float(-np.mean(logp[np.arange(len(labels)), labels])),
  }


@pytest.fixture(scope="module")
def data_cfg():
  return data_config.default_data_config()  # embedded digits, 32 px


@pytest.fixture(scope="module")
def digits_eval(data_cfg):
  """The eval split as the pipeline prepares it (numpy; padding removed by the mask)."""
  batches = list(pipeline.create_eval_iterator(data_cfg, 48, None))
  mask = np.concatenate([b["mask"] for b in batches]) > 0
  images = np.concatenate([b["image"] for b in batches])[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert len(batches) * 48 - SPLIT_SIZE == 25 and len(labels) == SPLIT_SIZE
  return images, labels


@pytest.fixture(scope="module")
def tiny():
  model = tiny_model()
  return model, random_variables(model, 0)


@pytest.fixture(scope="module")
def converted_dir(fixtures_dir, tmp_path_factory):
  model, variables = torch_to_flax(str(fixtures_dir / f"{FIXTURE}.pth"))
  return save_checkpoint(str(tmp_path_factory.mktemp("conv") / FIXTURE), model, variables)


# ------------------------------------------------------------------ counting and exactness


def test_counts_every_example_once_on_1_and_8_devices(tiny, data_cfg, digits_eval):
  model, variables = tiny
  results = {n: ev.evaluate(model, variables, data_cfg, 48, mesh_of(n)) for n in (1, 8)}
  ref = reference_metrics(model, variables, *digits_eval)
  for n, r in results.items():
    assert r["count"] == r["num_examples"] == SPLIT_SIZE, (n, r)
    assert r["num_batches"] == 8 and r["num_devices"] == n
    assert (r["top1_hits"], r["top5_hits"]) == (ref["top1_hits"], ref["top5_hits"]), (n, r)
    assert r["top1"] == ref["top1_hits"] / SPLIT_SIZE
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert r["images_per_sec"] > 0 and r["split"] == "test"
  assert results[1]["loss"] == pytest.approx(results[8]["loss"], rel=1e-6)


def test_simulated_hosts_count_every_example_once(tiny, data_cfg, digits_eval):
  """3 processes' local batches (each read as that process would, padded to the same
  number of batches) laid side by side in one global batch: still every example once."""
  model, variables = tiny
  mesh = mesh_of(8)
  hosts = 3
  iters = [
      pipeline.create_eval_iterator(data_cfg, 48, None, process_index=i, process_count=hosts)
      for i in range(hosts)
  ]
  batches = []
  for parts in zip(*iters):
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    batches.append(pipeline.to_global_arrays(batch, sharding.batch_sharding(mesh)))
  assert len(batches) == pipeline.num_eval_batches(data_cfg, 48, process_count=hosts)
  r = ev.evaluate_batches(
      ev.make_eval_fn(model, mesh), ev.place_variables(variables, mesh), batches
  )
  ref = reference_metrics(model, variables, *digits_eval)
  assert r["count"] == SPLIT_SIZE
  assert (r["top1_hits"], r["top5_hits"]) == (ref["top1_hits"], ref["top5_hits"])
  assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)


# ------------------------------------------------------------------ converted fixture


def test_converted_fixture_reproduces_reference_predictions(fixtures_dir, converted_dir):
  """The fixture's inputs (floats, not representable as uint8 images for the pipeline) go
  through the same jitted, sharded, masked eval step that eval.py uses (8 devices, the 2
  examples padded to a batch of 8): the reference's ranking of the classes decides every
  top-1/top-5 hit, and the loss is the cross-entropy of the reference logits."""
  ref = np.load(fixtures_dir / f"{FIXTURE}.npz")
  ckpt = model_checkpoint.load_weights(converted_dir)
  assert ckpt.kind == "converted" and ckpt.model.num_classes == 10
  mesh = mesh_of(8)
  eval_fn = ev.make_eval_fn(ckpt.model, mesh)
  variables = ev.place_variables(ckpt.variables, mesh)
  x = np.transpose(ref["input_nchw"], (0, 2, 3, 1))
  n = len(x)
  order = np.argsort(-ref["logits"], axis=1)  # the reference's class ranking

  def run(labels):
    batch = {
        "image": np.concatenate([x, np.zeros((8 - n,) + x.shape[1:], np.float32)]),
        "label": np.concatenate([labels, np.zeros(8 - n, np.int32)]).astype(np.int32),
        "mask": np.concatenate([np.ones(n), np.zeros(8 - n)]).astype(np.float32),
    }
    return ev.evaluate_batches(
        eval_fn, variables, [pipeline.to_global_arrays(batch, sharding.batch_sharding(mesh))]
    )

  labels = order[:, 0]  # the reference's predictions
  r = run(labels)
  z = ref["logits"].astype(np.float64)
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  ref_loss = float(-np.mean(logp[np.arange(n), labels]))
  assert r["count"] == n and r["top1"] == 1.0 and r["top5"] == 1.0
  assert r["loss"] == pytest.approx(ref_loss, rel=1e-5)
  r = run(order[:, 4])  # 5th-ranked class: a top-5 hit only
  assert (r["count"], r["top1_hits"], r["top5_hits"]) == (n, 0, n)
  r = run(order[:, 5])  # 6th-ranked: no hit
  assert (r["count"], r["top1_hits"], r["top5_hits"]) == (n, 0, 0)


def test_eval_cli_on_converted_checkpoint(converted_dir, data_cfg, tmp_path, capsys, monkeypatch):
  """eval.py end to end on the converted fixture (10 classes, 32 px: fits the digits as
  is), batch 8 (45 batches, the last one 1 example): the JSON holds the whole split and the
  same numbers as the library on the same weights. The checkpoint directory is read-only,
  so the JSON goes to ./eval.json."""
  read_only = tmp_path / "read_only"
  shutil.copytree(converted_dir, read_only)
  os.chmod(read_only, 0o555)
  monkeypatch.chdir(tmp_path)
  try:
    assert eval_cli.run_argv(["eval.py", "--checkpoint", str(read_only), "--batch_size", "8"]) == 0
  finally:
    os.chmod(read_only, 0o755)
  out = tmp_path / "eval.json"
  assert not (read_only / "eval_test.json").exists()
  printed = capsys.readouterr().out
  assert "top-1" in printed and "images/s" in printed and "count 359" in printed
  result = json.loads(out.read_text())
  assert result["count"] == result["num_examples"] == SPLIT_SIZE
  assert (result["num_devices"], result["kind"], result["num_batches"]) == (8, "converted", 45)
  assert result["images_per_sec"] > 0
  ckpt = model_checkpoint.load_weights(converted_dir)
  direct = ev.evaluate(ckpt.model, ckpt.variables, data_cfg, 8, mesh_of(8))
  assert (result["top1"], result["top5"]) == (direct["top1"], direct["top5"])
  assert result["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_eval_cli_at_another_image_size(converted_dir, data_cfg, tmp_path):
  """--img_size 64 on the 32-px fixture: windows (the model as trained, on 2x2 windows per
  stage) and interpolate (a 64-px model with resampled strip weights) each evaluate the
  whole split at 64 px; windows equals the library on the same weights."""
  results = {}
  for mode in ("windows", "interpolate"):
    out = tmp_path / f"{mode}.json"
    argv = [
        "eval.py",
        "--checkpoint",
        converted_dir,
        "--batch_size",
        "120",
        "--img_size",
        "64",
        "--resize",
        mode,
        "--output",
        str(out),
    ]
    assert eval_cli.run_argv(argv) == 0
    results[mode] = json.loads(out.read_text())
    assert results[mode]["image_size"] == 64 and results[mode]["count"] == SPLIT_SIZE
  assert results["windows"]["model"]["img_size"] == 32
  assert results["interpolate"]["model"]["img_size"] == 64
  ckpt = model_checkpoint.load_weights(converted_dir)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.image_size = 64
  direct = ev.evaluate(ckpt.model, ckpt.variables, cfg, 120, mesh_of(8), any_size=True)
  assert results["windows"]["top1"] == direct["top1"]


def test_eval_cli_keeps_results_when_output_cannot_be_written(
    converted_dir, tmp_path, capsys, monkeypatch
):
  """--output fails only after the evaluation (here: its up-front check is skipped and its
  directory is a file): the results go to the default place, one error line says where,
  exit code 1. When nothing can be written they are printed as JSON instead."""
  ckpt = tmp_path / "ckpt"
  shutil.copytree(converted_dir, ckpt)
  (tmp_path / "file").write_text("")
  monkeypatch.setattr(eval_lib, "check_output", lambda output: None)
  monkeypatch.chdir(tmp_path)
  bad = str(tmp_path / "file" / "out.json")
  assert (
      eval_cli.run_argv(
          ["eval.py", "--checkpoint", str(ckpt), "--batch_size", "8", "--output", bad]
      )
      == 1
  )
  captured = capsys.readouterr()
  fallback = ckpt / "eval_test.json"
  assert re.fullmatch(
      rf"eval\.py: error: cannot write --output {re.escape(bad)} \(.+\); "
      rf"the results were written to {re.escape(str(fallback))} instead",
      captured.err.strip(),
  ), captured.err
  assert json.loads(fallback.read_text())["count"] == SPLIT_SIZE
  # nowhere to write (the last resort, ./eval.json, is in /proc too): printed as JSON
  monkeypatch.chdir("/proc/self")
  result = {"top1": 0.5, "count": SPLIT_SIZE}
  with pytest.raises(
      EvalError,
      match=r"cannot write the results to .* nor .*/proc/.*" r"eval.json .*printed above as JSON",
  ):
    eval_lib.write_results(result, bad, str(tmp_path / "file" / "default.json"))
  assert json.loads(capsys.readouterr().out) == result


# ------------------------------------------------------------------ training workdirs


def _train_state(model, seed, ema):
  """A TrainState as train.py saves it (AdamW state; EMA weights that differ)."""
  params = random_variables(model, seed)
  tx = optax.adamw(1e-3)
  return TrainState(
      step=jnp.array(seed, jnp.int32),
      params=params["params"],
      batch_stats=params["batch_stats"],
      opt_state=tx.init(params["params"]),
      ema=random_variables(model, seed + 100) if ema else {},
  )


def _write_workdir(path, states, evals, model, **data):
  """A train.py workdir: checkpoints/<step>/{state,meta}, config.json, metrics.jsonl."""
  from configs import default  # pylint: disable=g-import-not-at-top

  ckpt = train_checkpoint.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  for step, state in states.items():
    assert ckpt.save(
        step, state, {"model": model.config_dict(), "best_top1": 0.0}, {"top1": evals[step]}
    )
  ckpt.close()
  config = default.get_config()
  resolved = json.loads(config.to_json_best_effort())
  resolved["eval_batch_size"] = 48
  resolved["data"].update(data)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": resolved, "derived": {"model": model.config_dict()}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step, top1 in evals.items():
      f.write(json.dumps({"step": step, "kind": "eval", "top1": top1}) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  model = tiny_model()
  states = {10: _train_state(model, 1, True), 20: _train_state(model, 2, True)}
  path = str(tmp_path_factory.mktemp("workdir"))
  _write_workdir(path, states, {10: 0.9, 20: 0.5}, model, eval_split="train")
  return path, states


def _assert_same(a, b):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b
  )


def test_workdir_latest_best_step_and_ema(workdir):
  path, states = workdir
  latest = model_checkpoint.load_weights(path)
  assert (latest.kind, latest.step, latest.ema) == ("workdir", 20, False)
  _assert_same(latest.variables, states[20].variables())
  best = model_checkpoint.load_weights(path, which="best")  # highest eval top-1: step 10
  assert best.step == 10
  _assert_same(best.variables, states[10].variables())
  ema = model_checkpoint.load_weights(os.path.join(path, "checkpoints", "10"), ema=True)
  assert (ema.step, ema.ema) == (10, True)
  _assert_same(ema.variables, states[10].variables(use_ema=True))
  assert ema.train_config["data"]["eval_split"] == "train"
  with pytest.raises(EvalError, match=r"no checkpoint of step 15 .*available steps: 10, 20"):
    model_checkpoint.load_weights(path, step=15)


def test_eval_cli_on_workdir_uses_its_config(workdir, data_cfg, tmp_path, capsys):
  """The default config is the workdir's (its eval_batch_size 48 is used), overridden by
  --config.data.*; --which best --ema picks step 10's EMA weights."""
  path, states = workdir
  out = tmp_path / "best_ema.json"
  assert (
      eval_cli.run_argv(
          [
              "eval.py",
              "--checkpoint",
              path,
              "--which",
              "best",
              "--ema",
              "--config.data.eval_split=test",
              "--output",
              str(out),
          ]
      )
      == 0
  )
  result = json.loads(out.read_text())
  assert (result["step"], result["ema"], result["split"]) == (10, True, "test")
  assert result["count"] == result["num_examples"] == SPLIT_SIZE
  assert (result["batch_size"], result["num_batches"]) == (48, 8)
  assert "step 10, EMA weights" in capsys.readouterr().out
  # the same weights through the library on one device: the same numbers
  direct = ev.evaluate(tiny_model(), states[10].variables(use_ema=True), data_cfg, 48, mesh_of(1))
  assert (result["top1"], result["top5"]) == (direct["top1"], direct["top5"])
  assert result["loss"] == pytest.approx(direct["loss"], rel=1e-6)
  # default output: WORKDIR/eval_<split>_step<N>.json
  assert (
      eval_cli.run_argv(
          ["eval.py", "--checkpoint", path, "--no-ema", "--config.data.eval_split=test"]
      )
      == 0
  )
  result = json.loads(open(os.path.join(path, "eval_test_step20.json")).read())
  assert (result["step"], result["ema"], result["count"]) == (20, False, SPLIT_SIZE)


# ------------------------------------------------------------------ errors


def _cli_error(capsys, *args):
  rc = eval_cli.run_argv(["eval.py", *args])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and err.startswith("eval.py: error: ") and "\n" not in err, (rc, err)
  return err


def test_clear_errors(converted_dir, workdir, tmp_path, capsys):
  path, _ = workdir
  assert "does not exist" in _cli_error(capsys, "--checkpoint", str(tmp_path / "nope"))
  assert "is not a checkpoint" in _cli_error(capsys, "--checkpoint", str(tmp_path))
  assert "available steps: 10, 20" in _cli_error(capsys, "--checkpoint", path, "--step", "7")
  assert "--ema apply to training workdirs" in _cli_error(
      capsys, "--checkpoint", converted_dir, "--ema"
  )
  assert "did you mean 'name'" in _cli_error(
      capsys, "--checkpoint", converted_dir, "--config.data.nme=x"
  )
  # a 64-px 100-class model on the 32-px 10-class digits: says so and which flag fixes it
  model = StripMLP(embed_dim=16, layers=(1, 0, 0, 0), img_size=64, num_classes=100)
  big = save_checkpoint(str(tmp_path / "big"), model, random_variables(model, 0))
  err = _cli_error(capsys, "--checkpoint", big)
  assert "64-px 100-class model" in err and "32-px with 10 classes" in err
  assert "--config.data.image_size=64" in err
  # a model description that contradicts the stored weights
  broken = str(tmp_path / "broken")
  shutil.copytree(converted_dir, broken)
  with open(os.path.join(broken, "config.json")) as f:
    meta = json.load(f)
  meta["model"]["num_classes"] = 100
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(meta, f)
  with pytest.raises(
      EvalError, match=r"params/head/kernel is \(320, 10\) in the checkpoint " r"but \(320, 100\)"
  ):
    model_checkpoint.load_weights(broken)
  # an explicit --config describing another architecture
  assert "does not match the config's model" in _cli_error(
      capsys,
      "--checkpoint",
      converted_dir,
      "--config",
      os.path.join(train_test_utils.REPO, "configs", "imagenet_tiny.py"),
  )
  # a workdir trained without EMA
  no_ema = str(tmp_path / "no_ema")
  m = tiny_model()
  _write_workdir(no_ema, {5: _train_state(m, 3, False)}, {5: 0.1}, m)
  assert "no EMA weights" in _cli_error(capsys, "--checkpoint", no_ema, "--ema")
  with pytest.raises(EvalError, match="multiple of the number of devices"):
    ev.evaluate(m, random_variables(m, 0), data_config.default_data_config(), 12, mesh_of(8))
