"""Smoke run of the model benchmark on a tiny config (numbers are not asserted)."""
import importlib.util
import json

from conftest import REPO


def _load_benchmark():
  spec = importlib.util.spec_from_file_location(
      "model_benchmark", REPO / "benchmarks" / "model_benchmark.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_model_benchmark_runs_on_tiny_config(tmp_path, capsys):
  bench = _load_benchmark()
  out = tmp_path / "bench.json"
  rows = bench.main(["--embed_dim", "16", "--layers", "1,1,1,1", "--img_size", "32",
                     "--num_classes", "10", "--batch_sizes", "2", "--repeats", "1",
                     "--json", str(out)])
  assert [(r["mode"], r["batch"]) for r in rows] == [("inference", 2), ("train", 2)]
  for r in rows:
    assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0
  # A train step costs about 3x the forward FLOPs (plus the optimizer, large at this size).
  assert 2 < rows[1]["gflops_per_image"] / rows[0]["gflops_per_image"] < 6
  assert json.loads(out.read_text())["rows"] == rows
  table = capsys.readouterr().out
  assert "| variant | batch | mode |" in table and "| tiny_light | 2 | train |" in table


def test_torch_malloc_gives_the_official_process_its_own_setting(monkeypatch):
  bench = _load_benchmark()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.other=1:" + ":".join(
      bench.host_memory.SETTINGS["resident"].tunables))
  same = bench.parse_args(["--malloc", "resident"])
  assert bench.torch_environ(same) is None  # inherits ours
  args = bench.parse_args(["--malloc", "resident", "--torch_malloc", "hugepages"])
  assert bench.torch_environ(args)["GLIBC_TUNABLES"] == "glibc.other=1:glibc.malloc.hugetlb=1"
  args = bench.parse_args(["--malloc", "resident", "--torch_malloc", "default"])
  assert bench.torch_environ(args)["GLIBC_TUNABLES"] == "glibc.other=1"
