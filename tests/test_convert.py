"""Converter: every checkpoint format users hold, refusal of bad input, both directions."""

import argparse
import collections
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import convert_torch_weights
import family_fixtures as ff
from conftest import FIXTURE_NAMES, REPO
from strip_mlp import load_checkpoint, save_checkpoint
from strip_mlp.checkpoints.train_checkpoint import Checkpointer
from strip_mlp.convert import flax_to_torch, torch_to_flax, variables_to_state_dict
from strip_mlp.errors import CheckpointFormatError
from strip_mlp.convert.torch_io import read_state_dict

SMALL = FIXTURE_NAMES[0]


@pytest.fixture(scope="module")
def fixture_sd(fixtures_dir):
  """The released-format state dict of the small fixture, as torch tensors."""
  return torch.load(fixtures_dir / f"{SMALL}.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  model, variables = torch_to_flax(str(fixtures_dir / f"{SMALL}.pth"))
  return model, variables


def assert_same_variables(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


class _Evil:
  """Unpickling this runs a shell command that creates a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_training_checkpoint_with_yacs_config_loads_without_yacs(
    tmp_path, fixture_sd, reference, monkeypatch
):
  path = tmp_path / "ckpt_epoch_299.pth"
  model_cfg = {"TYPE": "smlp", "NUM_CLASSES": 10, "SMLP": {"LAYERS": [1, 1, 2, 1]}}
  ff.save_training_checkpoint(path, fixture_sd, model_cfg, monkeypatch)
  assert "yacs.config.CfgNode" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
  monkeypatch.setitem(sys.modules, "yacs", None)  # yacs is not importable
  _, variables = torch_to_flax(str(path))
  assert_same_variables(variables, reference[1])


@pytest.mark.parametrize("wrap", ["bare", "module_prefix", "state_dict_key", "namespace_args"])
def test_state_dict_layouts(tmp_path, fixture_sd, reference, wrap):
  if wrap == "bare":
    obj = dict(fixture_sd)
  elif wrap == "module_prefix":  # DistributedDataParallel-wrapped model
    obj = {"model": collections.OrderedDict((f"module.{k}", v) for k, v in fixture_sd.items())}
  elif wrap == "state_dict_key":
    obj = {"state_dict": fixture_sd, "epoch": 3}
  else:  # timm-style trainers pickle their argparse arguments
    obj = {"state_dict": fixture_sd, "args": argparse.Namespace(lr=0.1, model="smlp")}
  torch.save(obj, tmp_path / "w.pth")
  _, variables = torch_to_flax(str(tmp_path / "w.pth"))
  assert_same_variables(variables, reference[1])


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle", "inside_training_ckpt"])
def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, fixture_sd, container):
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.pth"
  if container == "torch_zip":
    torch.save({"model": fixture_sd, "extra": _Evil(marker)}, path)
  elif container == "plain_pickle":
    with open(path, "wb") as f:
      pickle.dump({"model": _Evil(marker)}, f)
  else:
    torch.save({"model": fixture_sd, "config": {"hook": _Evil(marker)}, "epoch": 1}, path)
  with pytest.raises(CheckpointFormatError, match=r"refused to unpickle.*system"):
    read_state_dict(str(path))
  assert not marker.exists()


def test_truncated_file(tmp_path, fixtures_dir):
  data = (fixtures_dir / f"{SMALL}.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
    read_state_dict(str(tmp_path / "cut.pth"))


@pytest.mark.parametrize("content", ["plain_list_pickle", "torch_list", "text", "dict_no_model"])
def test_non_checkpoint_files(tmp_path, content):
  path = tmp_path / "x.pth"
  if content == "plain_list_pickle":
    path.write_bytes(pickle.dumps([1, 2, 3]))
    match = "not a PyTorch checkpoint"
  elif content == "torch_list":
    torch.save([torch.zeros(2)], path)
    match = "holds a list"
  elif content == "text":
    path.write_text("hello")
    match = "not a readable PyTorch checkpoint"
  else:
    torch.save({"epoch": 3, "optimizer": {}}, path)
    match = "no state dict found"
  with pytest.raises(CheckpointFormatError, match=match):
    read_state_dict(str(path))


@pytest.mark.parametrize(
    "edit,match",
    [
        ("drop", r"missing: blocks3\.1\.channel_mixing\.fc2\.bias"),
        ("extra", r"unexpected: blocks1\.0\.extra\.weight"),
        ("shape", r"shape mismatch: blocks1\.0\.channel_mixing\.fc1\.weight \(120, 39\)"),
        ("rename", "not a Strip-MLP state dict"),
    ],
)
def test_architecture_mismatch_names_the_keys(tmp_path, fixture_sd, edit, match):
  sd = dict(fixture_sd)
  if edit == "drop":
    del sd["blocks3.1.channel_mixing.fc2.bias"]
  elif edit == "extra":
    sd["blocks1.0.extra.weight"] = torch.zeros(3)
  elif edit == "shape":
    sd["blocks1.0.channel_mixing.fc1.weight"] = torch.zeros(120, 39)
  else:
    sd["stem.weight"] = sd.pop("patch_embed.weight")
  torch.save({"model": sd}, tmp_path / "w.pth")
  with pytest.raises(CheckpointFormatError, match=match):
    torch_to_flax(str(tmp_path / "w.pth"))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_round_trip_torch_flax_torch_is_identical(fixtures_dir, name):
  original = torch.load(fixtures_dir / f"{name}.pth", weights_only=True)["model"]
  _, variables = torch_to_flax(str(fixtures_dir / f"{name}.pth"))
  back = flax_to_torch(variables)
  # Same keys as the official model's state_dict (so strict=True loading accepts it).
  assert set(back) == set(original)
  for k, v in original.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    if k.endswith("num_batches_tracked"):
      assert int(back[k]) == 0  # the counter is not part of the function; reset
    else:
      assert torch.equal(back[k], v), k


def test_reverse_state_dict_is_plain_numpy(reference):
  sd = variables_to_state_dict(reference[1])
  assert sd["patch_embed.weight"].shape == (40, 3, 4, 4)
  assert sd["blocks1.0.token_mixing.smlp_block.proj_h.weight"].shape == (5 * 8, 8, 1, 3)
  assert sd["blocks2.0.token_mixing.smlp_block.proj_h.weight"].shape == (20 * 4, 4, 1, 3)
  assert sd["blocks1.0.channel_mixing.grn.gamma"].shape == (1, 1, 1, 120)


def _run_cli(*args, max_file_size=None):
  """Runs the converter; `max_file_size` (bytes) makes larger writes fail (EFBIG) as a full
  disk makes them fail (ENOSPC)."""
  cmd = [sys.executable, str(REPO / "convert_torch_weights.py"), *map(str, args)]
  if max_file_size:
    cmd[1:1] = [
        "-c",
        "import resource, runpy, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_size}, -1))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')",
    ]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def _assert_one_line_error(res, *fragments):
  """Exit code 1 and exactly one stderr line, `convert_torch_weights.py: error: ...`."""
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 1 and len(lines) == 1, res.stderr[-3000:]
  assert lines[0].startswith("convert_torch_weights.py: error: "), lines[0]
  assert "Traceback" not in res.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_cli_writes_checkpoint_that_loads_and_reverses(tmp_path, fixtures_dir, reference):
  out = tmp_path / "converted"
  res = _run_cli(fixtures_dir / f"{SMALL}.pth", out)
  assert res.returncode == 0, res.stderr
  assert "embed_dim=40" in res.stdout
  assert sorted(os.listdir(tmp_path)) == ["converted"]  # no staging leftovers
  meta = json.loads((out / "config.json").read_text())
  assert meta["model"]["layers"] == [1, 1, 2, 1] and meta["model"]["img_size"] == 32
  model, variables = load_checkpoint(str(out))
  assert model == reference[0]
  assert_same_variables(variables, reference[1])
  model16, _ = load_checkpoint(str(out), dtype="bfloat16")
  assert model16.dtype == "bfloat16"

  res = _run_cli("--to-torch", out, tmp_path / "back.pth")
  assert res.returncode == 0, res.stderr
  back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
  original = torch.load(fixtures_dir / f"{SMALL}.pth", weights_only=True)["model"]
  assert set(back) == set(original)
  assert all(
      torch.equal(back[k], v) for k, v in original.items() if not k.endswith("num_batches_tracked")
  )

  # Converting again onto the finished checkpoint is refused and leaves it intact.
  res = _run_cli(fixtures_dir / f"{SMALL}.pth", out)
  assert res.returncode == 1 and "already exists" in res.stderr
  assert_same_variables(load_checkpoint(str(out))[1], reference[1])


@pytest.mark.parametrize("case", ["corrupt", "unwritable"])
def test_cli_bad_input_one_line_error_and_no_output(tmp_path, fixtures_dir, case):
  if case == "corrupt":
    src = tmp_path / "bad.pth"
    src.write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "out"
  else:
    src = fixtures_dir / f"{SMALL}.pth"
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"  # parent is a file: cannot be created
  res = _run_cli(src, out)
  _assert_one_line_error(res)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_load_checkpoint_of_non_checkpoint_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_torch_weights.py"):
    load_checkpoint(str(tmp_path))


def test_cli_main_in_process_reports_errors(tmp_path, capsys):
  assert convert_torch_weights.main([str(tmp_path / "missing.pth"), str(tmp_path / "o")]) == 1
  assert "no such file" in capsys.readouterr().err


def test_package_and_model_work_without_tensorflow_and_torch():
  code = (
      "import sys; sys.modules['torch'] = None; sys.modules['tensorflow'] = None\n"
      "import jax, jax.numpy as jnp, strip_mlp\n"
      "m = strip_mlp.StripMLP(embed_dim=16, layers=(1, 0, 0, 1), img_size=32, num_classes=3)\n"
      "v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))\n"
      "print(m.apply(v, jnp.ones((1, 32, 32, 3))).shape)\n"
      "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
  )
  res = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=600,
      check=False,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  assert "(1, 3)" in res.stdout


# ----------------------------------------------------------------------------- CLI errors


@pytest.fixture(scope="module")
def converted(tmp_path_factory, reference):
  return save_checkpoint(str(tmp_path_factory.mktemp("conv") / "small"), *reference)


@pytest.mark.parametrize("case", ["unwritable", "to_torch_disk_full", "to_checkpoint_disk_full"])
def test_cli_write_failures_are_one_line_and_leave_nothing(converted, fixtures_dir, tmp_path, case):
  """Nothing can be created in /proc; a file-size limit makes writes fail mid-file (EFBIG)
  as a full disk does (ENOSPC), in the orbax direction inside tensorstore."""
  if case == "unwritable":
    if not os.path.isdir("/proc/self"):
      pytest.skip("needs Linux /proc")
    _assert_one_line_error(_run_cli("--to-torch", converted, "/proc/x.pth"), "cannot write")
    return
  if case == "to_torch_disk_full":
    args, name, says = ["--to-torch", converted], "out.pth", "; nothing was written"
  else:
    args, name, says = [fixtures_dir / f"{SMALL}.pth"], "out", " (the weights need about 7.3 MiB)"
  res = _run_cli(*args, tmp_path / name, max_file_size=64 << 10)
  _assert_one_line_error(res, f"cannot write {tmp_path / name}: file too large{says}")
  assert os.listdir(tmp_path) == []  # no partial output, no temporary file


def _main_error(capsys, *args, code=1):
  assert convert_torch_weights.main(list(map(str, args))) == code
  err = capsys.readouterr().err
  assert err.startswith("convert_torch_weights.py: error: ") and err.count("\n") == 1, err
  return err


def test_cli_refuses_existing_outputs_and_says_what_they_are(
    converted, fixtures_dir, tmp_path, capsys
):
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  assert "empty.pth already exists (a file); choose a new output file" in _main_error(
      capsys, "--to-torch", converted, empty
  )
  assert "empty.pth already exists and is not a directory; choose a new output directory" in (
      _main_error(capsys, fixtures_dir / f"{SMALL}.pth", empty)
  )
  assert "already exists (a directory)" in _main_error(capsys, "--to-torch", converted, tmp_path)
  assert "cannot write" in _main_error(capsys, "--to-torch", converted, empty / "out.pth")
  assert empty.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["empty.pth"]


def test_cli_wrong_kinds_of_input_say_what_is_expected(converted, fixtures_dir, tmp_path, capsys):
  err = _main_error(capsys, converted, tmp_path / "out")
  assert (
      f"{converted} is a directory, not a PyTorch .pth file; to export a checkpoint "
      f"directory or train.py workdir to .pth use --to-torch {converted} OUT.pth"
  ) in err
  assert "drop --to-torch" in _main_error(
      capsys, "--to-torch", fixtures_dir / f"{SMALL}.pth", tmp_path / "o.pth"
  )
  assert "is not a checkpoint" in _main_error(capsys, "--to-torch", tmp_path, tmp_path / "o.pth")
  assert "apply to training workdirs only" in _main_error(
      capsys, "--to-torch", converted, tmp_path / "o.pth", "--ema"
  )
  assert "apply to --to-torch only" in _main_error(
      capsys, fixtures_dir / f"{SMALL}.pth", tmp_path / "o", "--step", "3", code=2
  )
  assert "unrecognized arguments: --bogus" in _main_error(capsys, "a", "b", "--bogus", code=2)
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- training workdirs


def _scaled(variables, factor):
  return jax.tree_util.tree_map(lambda x: np.asarray(x) * np.float32(factor), dict(variables))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, reference):
  """A train.py workdir of the fixture's model: step 10 (best eval top-1) holds the
  fixture's weights as raw weights and 2x them as EMA weights, step 20 holds 3x as raw."""
  model, variables = reference
  path = tmp_path_factory.mktemp("workdir")
  ckpt = Checkpointer(str(path / "checkpoints"), async_save=False)
  for step, raw, ema, top1 in ((10, 1, 2, 0.9), (20, 3, 4, 0.5)):
    state = {
        "step": np.int32(step),
        **_scaled(variables, raw),
        "ema": _scaled(variables, ema),
        "opt_state": {"mu": _scaled(variables, 0)["params"]},
    }
    assert ckpt.save(step, state, {"model": model.config_dict()}, {"top1": top1})
  ckpt.close()
  return path


def _assert_exported(path, expected):
  """The .pth at `path` holds the state dict `expected` (num_batches_tracked aside)."""
  got = torch.load(path, weights_only=True)["model"]
  assert set(got) == set(expected)
  assert all(
      torch.equal(got[k], v) for k, v in expected.items() if not k.endswith("num_batches_tracked")
  )


def test_cli_exports_a_training_workdir(workdir, reference, fixture_sd, tmp_path, capsys):
  res = _run_cli("--to-torch", workdir, tmp_path / "latest.pth")  # latest step, raw weights
  assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert "training workdir, step 20, raw weights" in res.stdout
  _assert_exported(tmp_path / "latest.pth", flax_to_torch(_scaled(reference[1], 3)))
  assert (
      convert_torch_weights.main(
          ["--to-torch", str(workdir), str(tmp_path / "best.pth"), "--which", "best"]
      )
      == 0
  )
  _assert_exported(tmp_path / "best.pth", fixture_sd)  # step 10's: the fixture's
  assert (
      convert_torch_weights.main(
          ["--to-torch", str(workdir / "checkpoints" / "10"), str(tmp_path / "ema.pth"), "--ema"]
      )
      == 0
  )
  assert "step 10, EMA weights" in capsys.readouterr().out
  _assert_exported(tmp_path / "ema.pth", flax_to_torch(_scaled(reference[1], 2)))
  assert "available steps: 10, 20" in _main_error(
      capsys, "--to-torch", workdir, tmp_path / "x.pth", "--step", "15"
  )
  assert "either --step=N or --which=best" in _main_error(
      capsys, "--to-torch", workdir, tmp_path / "x.pth", "--step", "10", "--which", "best"
  )
  assert sorted(os.listdir(tmp_path)) == ["best.pth", "ema.pth", "latest.pth"]
