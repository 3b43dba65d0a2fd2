"""The data config (strip_mlp.data.config): TF-free, and its names agree with the modules that
implement them."""

import os
import subprocess
import sys

import pytest

from strip_mlp.data import config as data_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_and_package_import_without_tensorflow():
  code = (
      "import sys; import strip_mlp.data, strip_mlp.data.config as c; "
      "c.parse_rand_augment(c.default_data_config().randaugment); "
      "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
      "assert not bad, bad"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_names_match_their_implementations():
  from strip_mlp.data import digits, pil_resize  # pylint: disable=g-import-not-at-top

  assert tuple(digits.EMBEDDED_BUILDERS) == data_config.EMBEDDED_DATASETS
  assert set(pil_resize.FILTERS) == set(data_config.PIL_INTERPOLATIONS)
  assert set(data_config.PIL_INTERPOLATIONS) < set(data_config.INTERPOLATIONS)
  cfg = data_config.default_data_config()
  assert cfg.source in data_config.SOURCES and cfg.name in data_config.EMBEDDED_DATASETS
  assert cfg.image_dtype in data_config.IMAGE_DTYPES
  assert cfg.interpolation in data_config.INTERPOLATIONS
  assert cfg.jpeg_dct_method in data_config.JPEG_DCT_METHODS
  assert cfg.random_erasing_mode in data_config.ERASING_MODES


def test_local_batch_size():
  assert data_config.local_batch_size(12, 4) == 3
  for bad in ((6, 4), (0, 1), (-4, 2)):
    with pytest.raises(ValueError, match="multiple of the process count"):
      data_config.local_batch_size(*bad)


def test_default_tfds_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert data_config.default_tfds_dir() == str(tmp_path)
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert data_config.default_tfds_dir() == os.path.expanduser("~/tensorflow_datasets")
