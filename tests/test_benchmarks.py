"""Smoke runs of the three benchmarks on tiny settings: each prints its machine header and
table (the numbers are not asserted, the rows and columns are)."""

import importlib.util
import json

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
