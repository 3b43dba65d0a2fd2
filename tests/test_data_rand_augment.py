"""RandAugment (strip_mlp.data.rand_augment): PIL's point-op formulas, geometry, spec parsing
(strip_mlp.data.config) and determinism."""

import numpy as np
import pytest
import tensorflow as tf

from data_test_utils import ramp_image, seed  # noqa: E402

from strip_mlp.data import config as data_config  # noqa: E402
from strip_mlp.data import rand_augment as RA  # noqa: E402


def test_rand_augment_point_ops_match_pil_formulas():
  x = ramp_image()
  t = tf.constant(x)
  np.testing.assert_array_equal(RA.invert(t).numpy(), 255 - x)
  np.testing.assert_array_equal(RA.solarize(t, 128).numpy(), np.where(x >= 128, 255 - x, x))
  np.testing.assert_array_equal(
      RA.solarize_add(t, 50).numpy(), np.where(x < 128, np.minimum(x.astype(int) + 50, 255), x)
  )
  np.testing.assert_array_equal(RA.posterize(t, 2).numpy(), x & 0b11000000)
  np.testing.assert_array_equal(RA.posterize(t, 8).numpy(), x)
  low = (x // 4 + 40).astype(np.uint8)  # range [40, 103] per channel
  ac = RA.auto_contrast(tf.constant(low)).numpy()
  assert ac.min() == 0 and ac.max() == 255
  eq = RA.equalize(tf.constant(low)).numpy()
  assert eq.max() >= 240 and eq.min() <= 16
  np.testing.assert_array_equal(RA.brightness(t, 1.0).numpy(), x)
  np.testing.assert_array_equal(RA.contrast(t, 1.0).numpy(), x)
  gray = RA.color(t, 0.0).numpy()
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 1], gray[..., 2])


def test_rand_augment_geometry():
  x = ramp_image()
  t = tf.constant(x)
  fill = (124, 116, 104)
  np.testing.assert_array_equal(RA.rotate(t, 0.0, fill).numpy(), x)
  moved = RA.translate_x(t, 5.0, fill).numpy()  # PIL: content moves left by 5
  np.testing.assert_array_equal(moved[:, :-5], x[:, 5:])
  np.testing.assert_array_equal(moved[:, -5:], np.broadcast_to(fill, moved[:, -5:].shape))
  down = RA.translate_y(t, -3.0, fill).numpy()
  np.testing.assert_array_equal(down[3:], x[:-3])
  square = np.zeros((21, 21, 3), np.uint8)
  square[2:5, 9:12] = 255  # a dot above the centre
  rot = RA.rotate(tf.constant(square), 90.0, (0, 0, 0)).numpy()  # counter-clockwise
  ys, xs = np.nonzero(rot[..., 0] > 128)
  assert abs(ys.mean() - 10) < 1 and xs.mean() < 6  # now left of the centre


def test_rand_augment_spec_and_determinism():
  spec = data_config.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert spec == data_config.RandAugmentSpec(
      magnitude=9.0, num_layers=2, magnitude_std=0.5, increasing=True, prob=0.5
  )
  with pytest.raises(ValueError, match="unknown RandAugment option"):
    data_config.parse_rand_augment("rand-m9-zz3")
  image = tf.constant(ramp_image())
  outs = [RA.rand_augment(image, seed(s)).numpy() for s in range(12)]
  assert all(o.shape == (24, 32, 3) and o.dtype == np.uint8 for o in outs)
  assert sum(not np.array_equal(o, ramp_image()) for o in outs) >= 4
  np.testing.assert_array_equal(RA.rand_augment(image, seed(3)).numpy(), outs[3])
