"""Mixup / CutMix (pure JAX): soft targets, the right partner, determinism, no TensorFlow."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from strip_mlp.train.mixup import mixup_cutmix, smooth_one_hot

B, H, W, K = 6, 16, 12, 10
LABELS = jnp.array([0, 3, 5, 7, 8, 9])


def index_images():
  """Example i is the constant image i, so every output pixel names its source."""
  return jnp.broadcast_to(jnp.arange(B, dtype=jnp.float32)[:, None, None, None], (B, H, W, 3))


def test_label_smoothing_only_when_disabled():
  images = index_images()
  out, targets = mixup_cutmix(
      jax.random.PRNGKey(0),
      images,
      LABELS,
      K,
      mixup_alpha=0.0,
      cutmix_alpha=0.0,
      label_smoothing=0.1,
  )
  np.testing.assert_array_equal(out, images)
  expected = np.full((B, K), 0.01, np.float32)
  expected[np.arange(B), np.asarray(LABELS)] = 0.91
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  np.testing.assert_allclose(smooth_one_hot(LABELS, K, 0.0).sum(-1), 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_mixes_with_reversed_partner(seed):
  out, targets = mixup_cutmix(
      jax.random.PRNGKey(seed),
      index_images(),
      LABELS,
      K,
      mixup_alpha=0.8,
      cutmix_alpha=0.0,
      label_smoothing=0.1,
  )
  out, targets = np.asarray(out), np.asarray(targets)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  lam = 1.0 - out[0, 0, 0, 0] / (B - 1)  # image 0 = lam*0 + (1-lam)*5
  partner = np.arange(B)[::-1]
  np.testing.assert_allclose(out[:, 0, 0, 0], lam * np.arange(B) + (1 - lam) * partner, atol=1e-5)
  assert np.ptp(out, axis=(1, 2, 3)).max() < 1e-5  # mixup is global, not spatial
  soft = np.asarray(smooth_one_hot(LABELS, K, 0.1))
  np.testing.assert_allclose(targets, lam * soft + (1 - lam) * soft[partner], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_partner_box_and_weights_targets_by_area(seed):
  images = index_images()
  out, targets = mixup_cutmix(
      jax.random.PRNGKey(seed),
      images,
      LABELS,
      K,
      mixup_alpha=0.0,
      cutmix_alpha=1.0,
      label_smoothing=0.0,
  )
  out, targets = np.asarray(out)[..., 0], np.asarray(targets)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  for i in range(B):
    j = B - 1 - i
    assert set(np.unique(out[i]).tolist()) <= {float(i), float(j)}
    frac_partner = np.mean(out[i] == j)
    # Weight on own class = 1 - pasted area (box is the same for the whole batch).
    assert targets[i, LABELS[i]] == pytest.approx(1.0 - frac_partner, abs=1e-6)
    assert targets[i, LABELS[j]] == pytest.approx(frac_partner, abs=1e-6)
    if frac_partner > 0:
      ys, xs = np.nonzero(out[i] == j)
      assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == len(ys)  # a rectangle


def test_switch_probability_deterministic_and_jittable():
  images = index_images()
  fn = jax.jit(lambda k: mixup_cutmix(k, images, LABELS, K))  # recipe defaults
  a, b = fn(jax.random.PRNGKey(7)), fn(jax.random.PRNGKey(7))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  outs = jax.vmap(fn)(jax.random.split(jax.random.PRNGKey(1), 200))[0]
  # CutMix leaves only the two source values in a pixel row; mixup blends all pixels alike.
  is_cutmix = np.asarray(jnp.ptp(outs, axis=(2, 3, 4)).max(axis=1) > 1e-6)
  assert 0.35 < is_cutmix.mean() < 0.65  # switch prob 0.5
  _, targets = fn(jax.random.PRNGKey(3))
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
  assert np.asarray(targets).min() >= 0.1 / K * 0.999  # smoothing floor


def test_mixup_module_imports_without_tensorflow():
  code = (
      "import sys; import strip_mlp.train.mixup; "
      "assert 'tensorflow' not in sys.modules, 'mixup pulled in tensorflow'"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
