"""Shared test set-up: 8 fake CPU devices (JAX on the CPU), one persistent compilation cache and quiet logs
for the whole session, the Strip-MLP reference fixtures, and the data sets the data tests read.

Every fixture lives in this repository. The Strip-MLP ones are tests/fixtures/strip_mlp/*.npz,
made by the official PyTorch code with tests/fixtures/strip_mlp/make_fixtures.py (its
docstring says how to regenerate them); their weights are rebuilt here from
tests/synthetic_weights.py."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on the CPU. libtpu (the `test` extra, for tests/test_compile_for.py) would
# otherwise look for a TPU in every process that starts JAX, with notices on stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "strip_mlp"
FIXTURE_NAMES = ("smlp_e40_i32_l1121_c10", "smlp_e48_i64_l1111_c100")


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache_and_quiet_logs():
  """Every test process shares the session's persistent compilation cache (also handed to
  subprocesses through train_test_utils.CACHE_ENV); absl/orbax INFO logs are off."""
  import train_test_utils  # pylint: disable=g-import-not-at-top

  train_test_utils.enable_compilation_cache()
  train_test_utils.quiet_logs()


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
  """A folder holding, for each name in FIXTURE_NAMES, NAME.npz (the official outputs, a copy
  of tests/fixtures/strip_mlp/NAME.npz) and NAME.pth (its weights as the release saves them:
  torch.save({'model': state_dict}), rebuilt by synthetic_weights and checked by checksum)."""
  import shutil  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  import synthetic_weights  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  out = tmp_path_factory.mktemp("strip_mlp_fixtures")
  for name in FIXTURE_NAMES:
    shutil.copyfile(FIXTURES / f"{name}.npz", out / f"{name}.npz")
    with np.load(FIXTURES / f"{name}.npz") as z:
      sd = synthetic_weights.rebuild(str(z["weights"]))
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, out / f"{name}.pth")
  return out


# ----------------------------------------------------------------------------- data sets
# Written once per module that uses them (tests/data_test_utils.py makes the files).


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from data_test_utils import write_image_folder  # pylint: disable=g-import-not-at-top

  root = str(tmp_path_factory.mktemp("imagefolder"))
  return root, write_image_folder(root)


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  from data_test_utils import write_tiny_tfds  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  write_tiny_tfds(data_dir)
  return data_dir


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_tfds"))


@pytest.fixture
def source_cfg(request, folder, tiny_tfds_dir):
  """(source name, cfg, {id: label} of the train split, of the eval split)."""
  from data_test_utils import (  # pylint: disable=g-import-not-at-top
      NO_AUG,
      TRAIN_PER_CLASS,
      TinyIds,
      folder_cfg,
      tfds_cfg,
  )

  if request.param == "folder":
    root, labels = folder
    n_train = sum(TRAIN_PER_CLASS)
    train = {i: l for i, l in labels.items() if i < n_train}
    val = {i: l for i, l in labels.items() if i >= n_train}
    return "folder", folder_cfg(root, **NO_AUG), train, val
  return (
      "tfds",
      tfds_cfg(tiny_tfds_dir),
      {i: i % 3 for i in TinyIds.TRAIN_IDS},
      {i: i % 3 for i in TinyIds.TEST_IDS},
  )
