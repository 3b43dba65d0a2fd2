"""Per-example transforms (strip_mlp.data.transforms): crop geometry, eval resize, random
erasing."""

import numpy as np
import pytest
import tensorflow as tf

from data_test_utils import ramp_image, seed  # noqa: E402

from strip_mlp.data import transforms as T  # noqa: E402


def test_random_resized_crop_window_obeys_scale_ratio_and_is_seeded():
  areas, ratios = [], []
  for s in range(40):
    top, left, h, w = T.random_resized_crop_window(tf.constant([300, 400]), seed(s)).numpy()
    assert 0 <= top <= 300 - h and 0 <= left <= 400 - w and h > 0 and w > 0
    areas.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert 0.08 - 0.01 <= min(areas) and max(areas) <= 1.0
  assert 3 / 4 - 0.02 <= min(ratios) and max(ratios) <= 4 / 3 + 0.02
  assert max(areas) - min(areas) > 0.3  # really random
  a = T.random_resized_crop_window(tf.constant([300, 400]), seed(5)).numpy()
  b = T.random_resized_crop_window(tf.constant([300, 400]), seed(5)).numpy()
  np.testing.assert_array_equal(a, b)
  # No attempt can fit a 10 x 1000 strip at scale >= 0.9: central crop clamped to ratio 4/3.
  fallback = T.random_resized_crop_window(tf.constant([10, 1000]), seed(1), scale=(0.9, 1.0))
  np.testing.assert_array_equal(fallback.numpy(), [0, (1000 - 13) // 2, 10, 13])


def test_fused_jpeg_crop_matches_decode_then_crop():
  image = ramp_image(48, 64)
  jpeg = tf.io.encode_jpeg(image, quality=95)
  window = tf.constant([5, 9, 30, 40])
  fused = T.decode_and_crop(jpeg, lambda hw: window).numpy()
  full = tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE").numpy()[5:35, 9:49]
  assert fused.shape == (30, 40, 3)
  assert np.abs(fused.astype(int) - full.astype(int)).max() <= 2
  png = T.decode_and_crop(tf.io.encode_png(image), lambda hw: window).numpy()
  np.testing.assert_array_equal(png, image[5:35, 9:49])  # non-JPEG path, lossless


@pytest.mark.parametrize(
    "hw,size,expected",
    [((375, 500), 224, (256, 341)), ((100, 50), 224, (512, 256)), ((64, 64), 64, (73, 73))],
)
def test_eval_resize_shorter_side_then_center_crop(hw, size, expected):
  new_h, new_w = T.eval_resize_shape(hw[0], hw[1], size)
  assert (int(new_h), int(new_w)) == expected  # int(R * 256 / 224) on the short side
  image = np.zeros(hw + (3,), np.uint8)
  image[hw[0] // 2 - 2 : hw[0] // 2 + 2, hw[1] // 2 - 2 : hw[1] // 2 + 2] = 255  # centred dot
  out = T.eval_resize_and_center_crop(tf.constant(image), size).numpy()
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  ys, xs = np.nonzero(out[..., 0] > 128)
  assert abs(ys.mean() - (size - 1) / 2) < 1.5 and abs(xs.mean() - (size - 1) / 2) < 1.5


def test_resize_and_random_crop_is_a_window_of_the_shorter_side_resize():
  image = tf.constant(ramp_image(48, 64))
  full = T.resize(image, [36, 48], "bilinear").numpy()  # int(32 * 9/8) = 36 on the short side
  offsets = set()
  for s in range(30):
    out = T.resize_and_random_crop(image, seed(s), 32, 9 / 8, "bilinear").numpy()
    assert out.shape == (32, 32, 3)
    hits = [
        (t, l)
        for t in range(36 - 32 + 1)
        for l in range(48 - 32 + 1)
        if np.array_equal(out, full[t : t + 32, l : l + 32])
    ]
    assert hits, "not a window of the resized image"
    offsets.add(hits[0])
  assert len(offsets) > 8  # placed at random, not centred
  tc = T.TransformConfig(
      image_size=32,
      small_image_size=0,
      resize_random_crop=True,
      eval_resize_ratio=9 / 8,
      hflip_prob=0.0,
      randaugment=None,
      random_erasing_prob=0.0,
      mean=(0.0, 0.0, 0.0),
      std=(1 / 255, 1 / 255, 1 / 255),
      train_pil_resize=True,
      interpolation="bilinear",
  )
  out = T.train_transform(image, seed(3), tc).numpy()
  expected = T.resize_and_random_crop(image, T.split_seed(seed(3), 4)[0], 32, 9 / 8, "bilinear")
  np.testing.assert_allclose(out, expected.numpy().astype(np.float32), atol=1e-3)


def test_pad_crop_flip_normalize():
  image = tf.constant(ramp_image(32, 32))
  crops = [T.pad_and_random_crop(image, seed(s), 32, 4).numpy() for s in range(8)]
  assert all(c.shape == (32, 32, 3) for c in crops)
  assert any(not np.array_equal(c, image.numpy()) for c in crops)
  for c in crops:  # a shifted copy of the original, zero-filled
    found = any(
        np.array_equal(
            c[max(0, dy) : 32 + min(0, dy), max(0, dx) : 32 + min(0, dx)],
            image.numpy()[max(0, -dy) : 32 - max(0, dy), max(0, -dx) : 32 - max(0, dx)],
        )
        for dy in range(-4, 5)
        for dx in range(-4, 5)
    )
    assert found
  flips = [T.random_flip_left_right(image, seed(s)).numpy() for s in range(16)]
  n_flipped = sum(np.array_equal(f, image.numpy()[:, ::-1]) for f in flips)
  assert 2 <= n_flipped <= 14
  x = T.normalize(tf.constant([[[0, 255, 124]]], tf.uint8)).numpy()[0, 0]
  np.testing.assert_allclose(
      x, [-0.485 / 0.229, (1 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225], rtol=1e-5
  )


def test_random_erasing_pixel_mode():
  image = tf.zeros([40, 40, 3])
  same = T.random_erasing(image, seed(0), prob=0.0).numpy()
  np.testing.assert_array_equal(same, 0)
  for s in range(5):
    out = T.random_erasing(image, seed(s), prob=1.0).numpy()
    changed = np.any(out != 0, axis=-1)
    ys, xs = np.nonzero(changed)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert changed.sum() >= 0.9 * box  # one filled rectangle
    assert 0.02 * 1600 * 0.5 <= box <= 1600 / 3 * 1.3
    assert 0.5 < out[changed].std() < 1.5  # N(0, 1) noise per pixel
  np.testing.assert_array_equal(
      T.random_erasing(image, seed(2), prob=1.0).numpy(),
      T.random_erasing(image, seed(2), prob=1.0).numpy(),
  )
