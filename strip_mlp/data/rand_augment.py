"""timm RandAugment ('rand-m9-mstd0.5-inc1') on uint8 (H, W, 3) images, with PIL's formulas.

Point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Color, Contrast,
Brightness, Sharpness) follow PIL's ImageOps / ImageEnhance arithmetic and truncation. The
geometric ops (Rotate, ShearX/Y, TranslateX/YRel) use PIL's Image.transform(AFFINE) coordinates
but sample bilinearly (TF's projective transform has no bicubic mode) instead of bicubic.

Random draws are stateless: `rand_augment(image, seed, ...)` with a (2,) int seed always
gives the same output.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from strip_mlp.data.config import DEFAULT_RANDAUGMENT, RandAugmentSpec, parse_rand_augment

_MAX_LEVEL = 10.0


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Splits a (2,) stateless seed into `num` independent (2,) seeds."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
  return [seeds[i] for i in range(num)]


def uniform(seed, shape=(), minval=0.0, maxval=1.0):
  """float32 U[minval, maxval) of `shape` from a (2,) stateless seed."""
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """float -> uint8 with PIL's truncation after clipping."""
  return tf.cast(tf.floor(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)


def _grayscale(image_f: tf.Tensor) -> tf.Tensor:
  """PIL RGB->L (ITU-R 601-2 luma, rounded), float (H, W, 1)."""
  weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.round(tf.reduce_sum(image_f * weights, axis=-1, keepdims=True))


def _blend(degenerate: tf.Tensor, image_f: tf.Tensor, factor) -> tf.Tensor:
  """PIL Image.blend(degenerate, image, factor) on float inputs -> uint8."""
  return _to_uint8(degenerate + factor * (image_f - degenerate))


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.autocontrast (cutoff 0), per channel."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return _to_uint8(x * scale + offset)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize, per channel."""

  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 256
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step == 0, c, tf.gather(lut, c))

  chans = [channel(image[..., i]) for i in range(3)]
  return tf.cast(tf.stack(chans, axis=-1), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` most significant bits (bits >= 8: unchanged)."""
  bits = tf.cast(bits, tf.int32)
  mask = tf.cast(tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - tf.minimum(bits, 8)) - 1), tf.int32)
  out = tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)
  return tf.where(bits >= 8, image, out)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts pixels >= threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x >= tf.cast(threshold, tf.int32), 255 - x, x), tf.uint8)


def solarize_add(image: tf.Tensor, add, threshold: int = 128) -> tf.Tensor:
  """Adds `add` (clipped at 255) to pixels < threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(add, tf.int32), 255), x), tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the grayscale image."""
  x = tf.cast(image, tf.float32)
  return _blend(_grayscale(x), x, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the mean gray level."""
  x = tf.cast(image, tf.float32)
  mean = tf.floor(tf.reduce_mean(_grayscale(x)) + 0.5)
  return _blend(mean, x, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend with black."""
  return _blend(0.0, tf.cast(image, tf.float32), factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border kept)."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(x)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  degenerate = tf.where(interior, smooth, x)
  return _blend(degenerate, x, factor)


def affine(image: tf.Tensor, matrix: Sequence, fill=(128, 128, 128)) -> tf.Tensor:
  """PIL Image.transform(AFFINE, matrix): output pixel (x, y) samples the input at
  (a x + b y + c, d x + e y + f) in PIL's corner coordinates; bilinear; out-of-image -> fill."""
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  # PIL samples at pixel centres (x + 0.5); TF's projective transform uses pixel indices.
  c = c + 0.5 * a + 0.5 * b - 0.5
  f = f + 0.5 * d + 0.5 * e - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  # Warp (image - fill) with fill 0, add fill back: uncovered pixels become `fill` per channel
  # and border pixels blend bilinearly between image and fill.
  fill = tf.constant(fill, tf.float32)
  x = tf.cast(image, tf.float32) - fill
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None],
      transforms=transform,
      output_shape=tf.shape(image)[:2],
      fill_value=0.0,
      interpolation="BILINEAR",
      fill_mode="CONSTANT",
  )[0]
  return tf.cast(tf.clip_by_value(tf.round(out + fill), 0.0, 255.0), tf.uint8)


def rotate(image: tf.Tensor, degrees, fill=(128, 128, 128)) -> tf.Tensor:
  """PIL Image.rotate(degrees): counter-clockwise about the image centre."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  theta = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b = tf.cos(theta), tf.sin(theta)
  d, e = -tf.sin(theta), tf.cos(theta)
  c = a * (-cx) + b * (-cy) + cx
  f = d * (-cx) + e * (-cy) + cy
  return affine(image, [a, b, c, d, e, f], fill)


def shear_x(image, factor, fill=(128, 128, 128)):
  return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)


def shear_y(image, factor, fill=(128, 128, 128)):
  return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)


def translate_x(image, pixels, fill=(128, 128, 128)):
  return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)


def translate_y(image, pixels, fill=(128, 128, 128)):
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)


def _rand_augment_ops(increasing: bool, fill, translate_pct: float = 0.45):
  """timm's 15 RandAugment ops as fn(image_uint8, level in [0, 10], sign +-1) -> uint8."""

  def enhance(fn):
    if increasing:  # factor 1 +- level/10 * 0.9
      return lambda img, lv, sg: fn(img, 1.0 + sg * (lv / _MAX_LEVEL) * 0.9)
    return lambda img, lv, sg: fn(img, (lv / _MAX_LEVEL) * 1.8 + 0.1)

  def post_bits(lv):
    bits = tf.cast(tf.floor(lv / _MAX_LEVEL * 4.0), tf.int32)
    return 4 - bits if increasing else bits

  def sol_thresh(lv):
    t = tf.cast(tf.floor(lv / _MAX_LEVEL * 256.0), tf.int32)
    return 256 - t if increasing else t

  def shift(img, lv, sg, axis):
    return sg * lv / _MAX_LEVEL * translate_pct * tf.cast(tf.shape(img)[axis], tf.float32)

  def tx(img, lv, sg):
    return translate_x(img, shift(img, lv, sg, 1), fill)

  def ty(img, lv, sg):
    return translate_y(img, shift(img, lv, sg, 0), fill)

  return [
      lambda img, lv, sg: auto_contrast(img),
      lambda img, lv, sg: equalize(img),
      lambda img, lv, sg: invert(img),
      lambda img, lv, sg: rotate(img, sg * lv / _MAX_LEVEL * 30.0, fill),
      lambda img, lv, sg: posterize(img, post_bits(lv)),
      lambda img, lv, sg: solarize(img, sol_thresh(lv)),
      lambda img, lv, sg: solarize_add(img, tf.cast(tf.floor(lv / _MAX_LEVEL * 110.0), tf.int32)),
      enhance(color),
      enhance(contrast),
      enhance(brightness),
      enhance(sharpness),
      lambda img, lv, sg: shear_x(img, sg * lv / _MAX_LEVEL * 0.3, fill),
      lambda img, lv, sg: shear_y(img, sg * lv / _MAX_LEVEL * 0.3, fill),
      tx,
      ty,
  ]


def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    spec: str | RandAugmentSpec = DEFAULT_RANDAUGMENT,
    fill=(124, 116, 104),
) -> tf.Tensor:
  """timm RandAugment on uint8 (H, W, 3).

  `num_layers` ops drawn uniformly with replacement; each applied with prob `prob` at
  magnitude clip(N(m, mstd), 0, 10); signed ops negate with prob 0.5. `fill` is the colour of
  uncovered pixels of geometric ops (timm: the dataset mean in 0-255).
  """
  if isinstance(spec, str):
    spec = parse_rand_augment(spec)
  ops = _rand_augment_ops(spec.increasing, tuple(float(v) for v in fill))
  image = tf.ensure_shape(image, [None, None, 3])
  for layer_seed in split_seed(seed, spec.num_layers):
    s_op, s_apply, s_mag, s_sign = split_seed(layer_seed, 4)
    op = tf.random.stateless_uniform([], s_op, 0, len(ops), dtype=tf.int32)
    level = tf.constant(spec.magnitude, tf.float32)
    if spec.magnitude_std == float("inf"):
      level = uniform(s_mag, (), 0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
      level = level + spec.magnitude_std * tf.random.stateless_normal([], s_mag)
    level = tf.clip_by_value(level, 0.0, _MAX_LEVEL)
    sign = tf.where(uniform(s_sign) > 0.5, -1.0, 1.0)
    branches = [
        (lambda fn=fn, img=image: tf.ensure_shape(fn(img, level, sign), [None, None, 3]))
        for fn in ops
    ]
    image = tf.cond(
        uniform(s_apply) <= spec.prob, lambda: tf.switch_case(op, branches), lambda: image
    )
  return image


def randint_inclusive(u: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
  """Maps uniforms u in [0, 1) to integers in [0, high] (like random.randint(0, high))."""
  high = tf.cast(high, tf.float32)
  return tf.cast(tf.minimum(tf.floor(u * (high + 1.0)), high), tf.int32)
