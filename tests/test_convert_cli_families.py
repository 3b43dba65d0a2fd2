"""`python convert_torch_weights.py IN OUT` on a file of each family, laid out as its release
saves it: exit code 0 and the summary line that the family (the registry) writes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import family_fixtures as ff
from conftest import FIXTURE_NAMES, REPO

# family -> (file name, how the release saves it, fixture, the summary after "converted ...: ")
RELEASES = {
    # Strip-MLP: {'model': state_dict} (tests/conftest.py writes its fixture so).
    "strip_mlp": (
        "smlp_e40.pth",
        "fixture",
        FIXTURE_NAMES[0],
        "Strip-MLP embed_dim=40 layers=[1, 1, 2, 1] img_size=32 num_classes=10",
    ),
    # PoolFormer: a plain state dict (poolformer_s12.pth.tar).
    "poolformer": (
        "poolformer_s12.pth.tar",
        "plain",
        "poolformer_l1121_i28_c10",
        "PoolFormer layers=[1, 1, 2, 1] embed_dims=[8, 12, 16, 16] num_classes=10",
    ),
    # RaftMLP: a plain state dict (ignite's Checkpoint({'model': model}), last_model_0.pt).
    "raftmlp": (
        "last_model_0.pt",
        "plain",
        "raftmlp_l1121_i32_c10",
        "RaftMLP dims=[8, 12, 8, 12] depths=[1, 1, 2, 1] img_size=32 num_classes=10",
    ),
    # MS-MLP: its trainer's checkpoint, with optimizer, scheduler and yacs config
    # (msmlp_tiny_patch4_ckpt_epoch299.pth).
    "msmlp": (
        "msmlp_tiny_patch4_ckpt_epoch299.pth",
        "training",
        "msmlp_e9_i32_d1211_c10",
        "MS-MLP embed_dim=9 depths=[1, 2, 1, 1] num_classes=10",
    ),
}


def _write_release(family, tmp_path, fixtures_dir, monkeypatch):
  name, layout, fixture, _ = RELEASES[family]
  path = tmp_path / name
  if layout == "fixture":
    path.write_bytes((fixtures_dir / f"{fixture}.pth").read_bytes())
  elif layout == "plain":
    ff.save_pth(path, ff.load(family, fixture)["sd"], "plain")
  else:
    with np.load(ff.FIXTURES / family / f"{fixture}.npz") as z:
      sd = {k[11:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("state_dict/")}
    model_cfg = {"TYPE": "msmlp", "NUM_CLASSES": 10, "MSMLP": {"DEPTHS": [1, 2, 1, 1]}}
    ff.save_training_checkpoint(path, sd, model_cfg, monkeypatch)
  return path


@pytest.mark.parametrize("family", sorted(RELEASES))
def test_cli_converts_a_released_file_of_each_family(family, tmp_path, fixtures_dir, monkeypatch):
  src = _write_release(family, tmp_path, fixtures_dir, monkeypatch)
  out = tmp_path / "out"
  res = subprocess.run(
      [sys.executable, str(REPO / "convert_torch_weights.py"), str(src), str(out)],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
      check=False,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.splitlines() == [f"converted {src} -> {out}: {RELEASES[family][3]}"]
  with open(out / "config.json") as f:
    saved = json.load(f)["model"]
  assert saved.get("family", "strip_mlp") == family  # Strip-MLP's configs carry no family
