"""Smoke runs of the benchmarks on tiny settings: each prints its machine header and table
(the numbers are not asserted, the rows and columns are)."""

import importlib.util
import json
import sys

import pytest

from conftest import REPO


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_model_benchmark_runs_on_tiny_config(tmp_path, capsys):
  bench = _load("model_benchmark")
  out = tmp_path / "bench.json"
  rows = bench.main(
      [
          "--embed_dim",
          "16",
          "--layers",
          "1,1,1,1",
          "--image_size",
          "32",
          "--num_classes",
          "10",
          "--batch_size",
          "2",
          "--repeats",
          "1",
          "--json",
          str(out),
      ]
  )
  assert [(r["mode"], r["batch"], r["setting"]) for r in rows] == [
      ("inference", 2, "as_shipped"),
      ("train", 2, "as_shipped"),
  ]
  for r in rows:
    assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0
    # The worker restarts itself with the package's allocator, as train.py does.
    assert r["allocator"] == ("mimalloc" if sys.platform.startswith("linux") else "glibc")
  # A train step costs about 3x the forward FLOPs (plus the optimizer, large at this size).
  assert 2 < rows[1]["gflops_per_image"] / rows[0]["gflops_per_image"] < 6
  assert json.loads(out.read_text())["rows"] == rows
  table = capsys.readouterr().out
  assert "| variant | R | batch | dtype | mode | setting |" in table
  assert "| custom | 32 | 2 | float32 | train | as_shipped |" in table and "jax=" in table


def test_train_step_benchmark_runs_on_tiny_config(capsys):
  rows = _load("train_step_benchmark").main(
      [
          "--embed_dim",
          "16",
          "--layers",
          "1,0,0,0",
          "--image_size",
          "32",
          "--repeats",
          "1",
          "--warmup",
          "0",
          "--batch_size",
          "8",
      ]
  )
  assert [(r["variant"], r["image_size"], r["batch"], r["dtype"]) for r in rows] == [
      ("custom", 32, 8, "float32")
  ]
  assert rows[0]["images_per_s"] > 0
  assert "| variant | R | batch | dtype | params M |" in capsys.readouterr().out


def test_input_pipeline_benchmark_runs_on_tiny_folder(capsys):
  table = _load("input_pipeline_benchmark").main(
      [
          "--num_images",
          "8",
          "--source_size",
          "40",
          "--image_size",
          "32",
          "--batch_size",
          "4",
          "--seconds",
          "0.5",
          "--warmup",
          "1",
          "--num_classes",
          "2",
          "--rows",
          "train,eval",
      ]
  )
  assert [r["pipeline"] for r in table] == ["train", "eval"]
  assert all(r["images_per_s"] > 0 for r in table)
  assert "| pipeline | preprocessing | transforms | images/s |" in capsys.readouterr().out


def test_family_benchmark_measures_and_trains_each_family(
    tmp_path, digits_dir, capsys, monkeypatch
):
  """Both parts on tiny settings: the speed rows (params from the worker, FLOPs, img/s) and
  train.py runs of a relative by `--config.model.name`, two seeds, read back per seed."""
  import train_test_utils  # pylint: disable=g-import-not-at-top

  for key, value in train_test_utils.CACHE_ENV.items():  # the second seed's compile is cached
    monkeypatch.setenv(key, value)
  bench = _load("family_benchmark")
  runs = tmp_path / "runs"
  result = bench.main(
      [
          "--variants=poolformer_s12",
          "--image_size=32",
          "--batch_size=2",
          "--repeats=1",
          "--warmup=0",
          "--train_variants=poolformer_s12",
          "--seeds=0,1",
          "--train_steps=3",
          "--train_flag=--config.warmup_steps=1",
          f"--train_flag=--config.data.data_dir={digits_dir}",
          f"--workdir={runs}",
      ]
  )
  (speed,) = result["speed"]
  assert (speed["model"], speed["family"], speed["params_m"]) == (
      "poolformer_s12",
      "poolformer",
      11.92,
  )
  assert speed["inference_images_per_s"] > 0 and speed["train_images_per_s"] > 0
  assert 2 < speed["gflops_train"] / speed["gflops_inference"] < 6
  (trained,) = result["train"]
  assert (trained["model"], trained["steps"], trained["seeds"]) == ("poolformer_s12", 3, 2)
  each = [float(t) for t in trained["top1_each"].split(" / ")]
  for seed, top1 in zip((0, 1), each):
    assert round(bench.read_run(str(runs / f"poolformer_s12_seed{seed}"))["top1"], 2) == top1
    assert 0 <= top1 <= 100
  assert trained["top1_mean"] == round(sum(each) / 2, 2) and trained["top1_std"] is not None
  out = capsys.readouterr().out
  assert "| model | family | params M | GFLOP/img inference |" in out
  assert "| poolformer_s12 | poolformer | 11.41 | 3 | 2 |" in out  # 32 px, 10 classes


def test_family_benchmark_refuses_unknown_models():
  bench = _load("family_benchmark")
  with pytest.raises(SystemExit, match="'poolformer_xl' is not one of"):
    bench.parse_args(["--variants=poolformer_xl"])


def test_a_killed_worker_is_one_line_that_says_why():
  """A worker the kernel kills (as when memory runs out) ends the benchmark with its name."""
  import sys  # pylint: disable=g-import-not-at-top

  bench_util = _load("bench_util")
  dies = "import json, os; print(json.dumps({}), flush=True); input(); os.kill(os.getpid(), 9)"
  worker = bench_util.Worker("msmlp_t", [sys.executable, "-c", dies])
  with pytest.raises(SystemExit, match=r"^msmlp_t: the worker stopped \(killed, .*memory"):
    worker.run("train")
  worker.close()  # a stopped worker closes quietly


def test_tpu_compile_benchmark_compares_formulations_by_the_compilers_figures(tmp_path):
  """One small Strip-MLP compiled for v5e:2x2 with two depthwise formulations: each row
  holds the compiler's memory, FLOPs and op census; the shifted sum is made of slices."""
  bench = _load("tpu_compile_benchmark")
  out = tmp_path / "tpu.json"
  bench.main(
      [
          "--models=tiny_light",
          "--layers=1,0,0,0",
          "--image_size=32",
          "--topologies=v5e:2x2",
          "--dtype=bfloat16",
          "--remat=off",
          "--impls=depthwise=xla,depthwise=shift",
          "--batch_per_chip=32",
          f"--json={out}",
      ]
  )
  rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"depthwise=xla", "depthwise=shift"}
  for r in rows.values():
    assert r["fits"] == "yes" and 0 < r["gib_per_chip"] < r["hbm_gib"]
    assert r["gflop_per_image"] > 0 and r["est_img_s"] > 0 and r["n_total"] > 0
  assert rows["depthwise=shift"]["n_slice"] > rows["depthwise=xla"]["n_slice"]


def test_tpu_compile_benchmark_row_of_a_step_the_compiler_refuses(tmp_path):
  """A batch over the HBM is a row that says the compiler refused it (no FLOPs or census),
  not a crash of the whole table."""
  bench = _load("tpu_compile_benchmark")
  row = dict(
      model="tiny_light",
      topology="v5e:2x2",
      image_size=224,
      dtype="bfloat16",
      remat="off",
      impl="",
      layers=[0, 0, 0, 0],
  )
  row = bench.run_row(row, 16384, max_batch=False)
  assert row["fits"] == "refused by the compiler"
  assert row["gib_per_chip"] > row["hbm_gib"]  # the temporaries the compiler said it needs
  assert "gflop_per_image" not in row and "n_total" not in row


def test_product_floor_benchmark_times_each_product_of_both_steps(capsys):
  """Every product of a tiny model's steps is timed alone; the products' FLOPs are part
  of the step's and the train step has the backward products too."""
  product_rows, step_rows = _load("product_floor_benchmark").main(
      [
          "--embed_dim=16",
          "--layers=1,0,0,0",
          "--image_size=32",
          "--num_classes=10",
          "--batch_size=2",
          "--repeats=1",
      ]
  )
  inference, train = step_rows
  assert (inference["mode"], train["mode"]) == ("inference", "train")
  assert train["products"] > 2 * inference["products"] > 0
  for row in step_rows:
    counted = [r for r in product_rows if r["mode"] == row["mode"]]
    assert sum(r["count"] for r in counted) == row["products"]
    assert 0 < row["product_gflops_per_image"] <= row["gflops_per_image"]
    assert row["products_ms"] > 0 and row["step_ms"] > 0
  out = capsys.readouterr().out
  assert "| variant | mode | op | lhs | rhs | count | ms each | GFLOP/s | ms total |" in out
  assert "| custom | train | dot_general |" in out
  assert "| custom | 32 | 2 | train |" in out


def test_product_floor_counts_the_branch_of_this_platform_and_each_scan_step():
  """`lax.platform_dependent` holds both backends' products: only the one that runs is
  counted (ops.linear's weight gradient differs by backend); a scan's product counts
  once per step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from strip_mlp.models import ops  # pylint: disable=g-import-not-at-top

  bench = _load("product_floor_benchmark")
  x, k = jnp.ones((4, 3)), jnp.ones((3, 2))
  grad = jax.make_jaxpr(jax.grad(lambda x, k: ops.linear(x, k).sum(), argnums=1))(x, k).jaxpr
  lhs = lambda found: sorted(avals[0].shape for _, avals, _ in found)
  assert lhs(bench.products(grad, "cpu")) == [(3, 4), (4, 2), (4, 3)]  # x.T @ g on CPU
  assert lhs(bench.products(grad, "tpu")) == [(4, 2), (4, 3), (4, 3)]  # x, g over rows
  scan = lambda c: jax.lax.scan(lambda c, _: (c @ k @ k.T, None), c, None, length=5)[0]
  assert sorted(bench.products(jax.make_jaxpr(scan)(x).jaxpr, "cpu").values()) == [5, 5]
