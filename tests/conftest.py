"""Shared test setup: 8 fake CPU devices for sharding tests, fixture paths."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "torch_reference"
FIXTURE_NAMES = ("smlp_e40_i32_l1121_c10", "smlp_e48_i64_l1111_c100")


@pytest.fixture(scope="session")
def fixtures_dir():
  if not FIXTURES.is_dir():
    pytest.fail(f"reference fixtures not found at {FIXTURES}: the repo must sit beside shared/")
  return FIXTURES
