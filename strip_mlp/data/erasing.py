"""timm's RandomErasing on a normalised (H, W, 3) float image, in TF ops, seeded."""

import math

import tensorflow as tf

from strip_mlp.data.config import ERASING_MODES
from strip_mlp.data.rand_augment import randint_inclusive, split_seed, uniform


def random_erasing(
    image: tf.Tensor,
    seed: tf.Tensor,
    prob: float = 0.25,
    mode: str = "pixel",
    count: int = 1,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> tf.Tensor:
  """timm RandomErasing on a normalised float (H, W, C) image.

  With probability `prob`, `count` rectangles (area U(min_area, max_area)/count of the image,
  log-uniform aspect in [min_aspect, 1/min_aspect], first of 10 attempts that fits) are
  replaced by N(0, 1) noise per pixel ('pixel'), per channel ('rand') or zeros ('const').
  """
  if mode not in ERASING_MODES:
    raise ValueError(f"random_erasing_mode must be one of {ERASING_MODES}, got {mode!r}")
  shape = tf.shape(image)
  height, width, chans = shape[0], shape[1], shape[2]
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s_apply, *s_boxes = split_seed(seed, 1 + count)

  def erase(img):
    for s_box in s_boxes:
      s_area, s_ratio, s_top, s_left, s_noise = split_seed(s_box, 5)
      target = uniform(s_area, [attempts], min_area, max_area) * hf * wf / count
      aspect = tf.exp(uniform(s_ratio, [attempts], math.log(min_aspect), -math.log(min_aspect)))
      h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
      w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
      ok = tf.logical_and(w < width, h < height)
      first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
      h_sel = tf.where(tf.reduce_any(ok), h[first], 0)
      w_sel = tf.where(tf.reduce_any(ok), w[first], 0)
      top = randint_inclusive(uniform(s_top), height - h_sel)
      left = randint_inclusive(uniform(s_left), width - w_sel)
      rows = tf.range(height)[:, None]
      cols = tf.range(width)[None, :]
      box = (rows >= top) & (rows < top + h_sel) & (cols >= left) & (cols < left + w_sel)
      if mode == "pixel":
        fill = tf.random.stateless_normal(shape, s_noise, dtype=img.dtype)
      elif mode == "rand":
        fill = tf.random.stateless_normal([1, 1, chans], s_noise, dtype=img.dtype) + tf.zeros_like(
            img
        )
      else:
        fill = tf.zeros_like(img)
      img = tf.where(box[..., None], fill, img)
    return img

  return tf.cond(uniform(s_apply) < prob, lambda: erase(image), lambda: image)
