"""Per-example tf.image transforms of the published Strip-MLP recipe (timm semantics).

All random ops are *stateless*: each takes a `seed`, an int32/int64 tensor of shape (2,),
so one (seed, example position) always gives the same output. Images are HWC.

Train (R > 32):  decode+random-resized-crop (fused for JPEG) -> resize R bicubic -> hflip
                 -> RandAugment (uint8) -> /255, normalise -> random erasing (float).
Train (R <= 32): decode -> pad 4 + random crop R -> hflip -> RandAugment -> normalise -> erase.
Eval  (R > 32):  decode -> resize shorter side to int(R * 256/224) bicubic -> center crop R.
Eval  (R <= 32): decode -> (resize to R x R only if needed) -> normalise.

Deviations from PIL/timm, kept small on purpose: resizing uses tf.image.resize (antialiased
Keys cubic, like PIL's bicubic when shrinking); RandAugment's geometric ops sample bilinearly
(TF's projective transform has no bicubic mode) instead of bicubic.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_LEVEL = 10.0


# ----------------------------------------------------------------------------- seeds / rng

def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Splits a (2,) stateless seed into `num` independent (2,) seeds."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
  return [seeds[i] for i in range(num)]


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _randint_inclusive(u: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
  """Maps uniforms u in [0, 1) to integers in [0, high] (like random.randint(0, high))."""
  high = tf.cast(high, tf.float32)
  return tf.cast(tf.minimum(tf.floor(u * (high + 1.0)), high), tf.int32)


# ----------------------------------------------------------------------------- decoding

def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes (scalar string) to uint8 (H, W, 3)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _as_uint8_rgb(image: tf.Tensor) -> tf.Tensor:
  """Accepts an already decoded (H, W, C) image with C in {1, 3}; returns uint8 (H, W, 3)."""
  if image.dtype != tf.uint8:
    image = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0, 255), tf.uint8)
  if image.shape.rank == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  image.set_shape([None, None, 3])
  return image


def decode_and_crop(image_or_bytes: tf.Tensor,
                    crop_fn: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
  """Decodes and crops in one step; JPEGs only decode the crop (decode_and_crop_jpeg).

  Args:
    image_or_bytes: scalar string (encoded image) or a decoded (H, W, C) image.
    crop_fn: maps the image shape (H, W) int32 to a crop window [top, left, h, w] int32.
  Returns:
    uint8 (h, w, 3).
  """
  if image_or_bytes.dtype != tf.string:
    image = _as_uint8_rgb(image_or_bytes)
    window = crop_fn(tf.shape(image)[:2])
    return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_or_bytes)
    window = crop_fn(shape[:2])
    return tf.image.decode_and_crop_jpeg(image_or_bytes, window, channels=3)

  def other():
    image = decode_image(image_or_bytes)
    window = crop_fn(tf.shape(image)[:2])
    return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]

  out = tf.cond(tf.io.is_jpeg(image_or_bytes), jpeg, other)
  out.set_shape([None, None, 3])
  return out


def decode_full(image_or_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes (or passes through) a whole image as uint8 (H, W, 3)."""
  if image_or_bytes.dtype != tf.string:
    return _as_uint8_rgb(image_or_bytes)
  return decode_image(image_or_bytes)


# ----------------------------------------------------------------------------- geometry

def resize(image: tf.Tensor, size_hw, method: str = 'bicubic') -> tf.Tensor:
  """Resizes a uint8 (H, W, 3) image to size_hw, rounded back to uint8.

  Antialiased (like PIL) when shrinking along either axis; plain interpolation when only
  enlarging, where both agree to < 0.2 grey levels and the plain kernel is ~4x faster.
  """
  image_f = tf.cast(image, tf.float32)
  size_hw = tf.cast(size_hw, tf.int32)
  shrink = tf.reduce_any(size_hw < tf.shape(image)[:2])
  out = tf.cond(shrink,
                lambda: tf.image.resize(image_f, size_hw, method=method, antialias=True),
                lambda: tf.image.resize(image_f, size_hw, method=method, antialias=False))
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def random_resized_crop_window(shape_hw: tf.Tensor, seed: tf.Tensor,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               attempts: int = 10) -> tf.Tensor:
  """timm RandomResizedCrop.get_params: [top, left, h, w] int32 of a random crop window.

  Ten vectorised attempts of area ~ U(scale) * H * W and log-uniform aspect ratio; the first
  one that fits wins, otherwise a central crop clamped to `ratio`.
  """
  height = tf.cast(shape_hw[0], tf.float32)
  width = tf.cast(shape_hw[1], tf.float32)
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  area = height * width
  target_area = _uniform(s_area, [attempts], scale[0], scale[1]) * area
  log_ratio = _uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  w = tf.round(tf.sqrt(target_area * aspect))
  h = tf.round(tf.sqrt(target_area / aspect))
  ok = tf.logical_and(w <= width, h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  any_ok = tf.reduce_any(ok)
  h_sel = tf.cast(h[first], tf.int32)
  w_sel = tf.cast(w[first], tf.int32)
  top = _randint_inclusive(_uniform(s_top), tf.cast(height, tf.int32) - h_sel)
  left = _randint_inclusive(_uniform(s_left), tf.cast(width, tf.int32) - w_sel)

  # Fallback: central crop with the aspect ratio clamped into `ratio`.
  in_ratio = width / height
  fw = tf.where(in_ratio < min(ratio), width,
                tf.where(in_ratio > max(ratio), tf.round(height * max(ratio)), width))
  fh = tf.where(in_ratio < min(ratio), tf.round(width / min(ratio)), height)
  fh, fw = tf.cast(fh, tf.int32), tf.cast(fw, tf.int32)
  ftop = (tf.cast(height, tf.int32) - fh) // 2
  fleft = (tf.cast(width, tf.int32) - fw) // 2
  return tf.where(any_ok, tf.stack([top, left, h_sel, w_sel]), tf.stack([ftop, fleft, fh, fw]))


def decode_and_random_resized_crop(image_or_bytes: tf.Tensor, seed: tf.Tensor, size: int,
                                   scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                   method: str = 'bicubic') -> tf.Tensor:
  """Fused decode + random-resized-crop -> uint8 (size, size, 3)."""
  crop = decode_and_crop(
      image_or_bytes, lambda hw: random_resized_crop_window(hw, seed, scale, ratio))
  return resize(crop, [size, size], method)


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor, size: int, padding: int = 4) -> tf.Tensor:
  """torchvision RandomCrop(size, padding): zero-pad `padding` px, random size x size crop."""
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  shape = tf.shape(image)
  s_top, s_left = split_seed(seed, 2)
  top = _randint_inclusive(_uniform(s_top), shape[0] - size)
  left = _randint_inclusive(_uniform(s_left), shape[1] - size)
  out = image[top:top + size, left:left + size]
  out.set_shape([size, size, 3])
  return out


def random_flip_left_right(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  """Horizontal flip with probability `prob`."""
  return tf.cond(_uniform(seed) < prob, lambda: tf.reverse(image, axis=[1]), lambda: image)


def eval_resize_shape(height, width, size: int, resize_ratio: float = 256 / 224):
  """torchvision Resize(int(size * ratio)): shorter side -> int(size*ratio), aspect kept."""
  short = tf.constant(int(size * resize_ratio), tf.int64)
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  new_h = tf.where(height <= width, short, (short * height) // width)
  new_w = tf.where(height <= width, (short * width) // height, short)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision CenterCrop: offset int(round((H - size) / 2))."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  out = image[top:top + size, left:left + size]
  out.set_shape([size, size, 3])
  return out


def eval_resize_and_center_crop(image: tf.Tensor, size: int, resize_ratio: float = 256 / 224,
                                method: str = 'bicubic') -> tf.Tensor:
  """Resize shorter side to int(size * resize_ratio), then center crop size -> uint8."""
  shape = tf.shape(image)
  new_h, new_w = eval_resize_shape(shape[0], shape[1], size, resize_ratio)
  return center_crop(resize(image, tf.stack([new_h, new_w]), method), size)


def normalize(image: tf.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tf.Tensor:
  """uint8 [0, 255] -> float32 (x / 255 - mean) / std (as one multiply-add)."""
  scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  return tf.cast(image, tf.float32) * scale + offset


# ----------------------------------------------------------------------------- random erasing

def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.25, mode: str = 'pixel',
                   count: int = 1, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10) -> tf.Tensor:
  """timm RandomErasing on a normalised float (H, W, C) image.

  With probability `prob`, `count` rectangles (area U(min_area, max_area)/count of the image,
  log-uniform aspect in [min_aspect, 1/min_aspect], first of 10 attempts that fits) are
  replaced by N(0, 1) noise per pixel ('pixel'), per channel ('rand') or zeros ('const').
  """
  if mode not in ('pixel', 'rand', 'const'):
    raise ValueError(f"random_erasing_mode must be 'pixel', 'rand' or 'const', got {mode!r}")
  shape = tf.shape(image)
  height, width, chans = shape[0], shape[1], shape[2]
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s_apply, *s_boxes = split_seed(seed, 1 + count)

  def erase(img):
    for s_box in s_boxes:
      s_area, s_ratio, s_top, s_left, s_noise = split_seed(s_box, 5)
      target = _uniform(s_area, [attempts], min_area, max_area) * hf * wf / count
      aspect = tf.exp(_uniform(s_ratio, [attempts], math.log(min_aspect), -math.log(min_aspect)))
      h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
      w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
      ok = tf.logical_and(w < width, h < height)
      first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
      h_sel = tf.where(tf.reduce_any(ok), h[first], 0)
      w_sel = tf.where(tf.reduce_any(ok), w[first], 0)
      top = _randint_inclusive(_uniform(s_top), height - h_sel)
      left = _randint_inclusive(_uniform(s_left), width - w_sel)
      rows = tf.range(height)[:, None]
      cols = tf.range(width)[None, :]
      box = ((rows >= top) & (rows < top + h_sel) & (cols >= left) & (cols < left + w_sel))
      if mode == 'pixel':
        fill = tf.random.stateless_normal(shape, s_noise, dtype=img.dtype)
      elif mode == 'rand':
        fill = tf.random.stateless_normal([1, 1, chans], s_noise, dtype=img.dtype) + tf.zeros_like(img)
      else:
        fill = tf.zeros_like(img)
      img = tf.where(box[..., None], fill, img)
    return img

  return tf.cond(_uniform(s_apply) < prob, lambda: erase(image), lambda: image)


# ----------------------------------------------------------------------------- RandAugment

@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """Parsed timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'."""
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  increasing: bool = False
  prob: float = 0.5


def parse_rand_augment(spec: str) -> RandAugmentSpec:
  """Parses 'rand-m9-n2-mstd0.5-inc1-p0.5' (timm syntax; m, n, mstd, inc, p)."""
  parts = spec.split('-')
  if parts[0] != 'rand':
    raise ValueError(f"randaugment must look like 'rand-m9-mstd0.5-inc1', got {spec!r}")
  kw = {}
  for part in parts[1:]:
    m = re.fullmatch(r'(mstd|inc|m|n|p)([0-9.]+|inf)', part)
    if not m:
      raise ValueError(f'unknown RandAugment option {part!r} in {spec!r} (use m, n, mstd, inc, p)')
    key, val = m.groups()
    if key == 'm':
      kw['magnitude'] = float(val)
    elif key == 'n':
      kw['num_layers'] = int(val)
    elif key == 'mstd':
      kw['magnitude_std'] = float(val)
    elif key == 'inc':
      kw['increasing'] = bool(int(val))
    else:
      kw['prob'] = float(val)
  return RandAugmentSpec(**kw)


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
  smooth = tf.round(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0])
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
      images=x[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
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


_RAND_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                    'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
                    'ShearY', 'TranslateXRel', 'TranslateYRel')


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

  def tx(img, lv, sg):
    return translate_x(img, sg * lv / _MAX_LEVEL * translate_pct * tf.cast(tf.shape(img)[1], tf.float32), fill)

  def ty(img, lv, sg):
    return translate_y(img, sg * lv / _MAX_LEVEL * translate_pct * tf.cast(tf.shape(img)[0], tf.float32), fill)

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


def rand_augment(image: tf.Tensor, seed: tf.Tensor, spec: str | RandAugmentSpec = 'rand-m9-mstd0.5-inc1',
                 fill=(124, 116, 104)) -> tf.Tensor:
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
    if spec.magnitude_std == float('inf'):
      level = _uniform(s_mag, (), 0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
      level = level + spec.magnitude_std * tf.random.stateless_normal([], s_mag)
    level = tf.clip_by_value(level, 0.0, _MAX_LEVEL)
    sign = tf.where(_uniform(s_sign) > 0.5, -1.0, 1.0)
    branches = [(lambda fn=fn, img=image: tf.ensure_shape(fn(img, level, sign), [None, None, 3]))
                for fn in ops]
    image = tf.cond(_uniform(s_apply) <= spec.prob,
                    lambda: tf.switch_case(op, branches), lambda: image)
  return image


# ----------------------------------------------------------------------------- full transforms

@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """Everything the per-example transforms need (built from the data ConfigDict)."""
  image_size: int
  interpolation: str = 'bicubic'
  random_resized_crop: bool = True
  rrc_scale: tuple = (0.08, 1.0)
  rrc_ratio: tuple = (3 / 4, 4 / 3)
  small_image_size: int = 32
  small_image_padding: int = 4
  hflip_prob: float = 0.5
  randaugment: str | None = 'rand-m9-mstd0.5-inc1'
  random_erasing_prob: float = 0.25
  random_erasing_mode: str = 'pixel'
  random_erasing_count: int = 1
  eval_crop: bool = True
  eval_resize_ratio: float = 256 / 224
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD

  @property
  def is_small(self) -> bool:
    return self.image_size <= self.small_image_size

  @property
  def fill(self) -> tuple:
    return tuple(min(255, round(255 * m)) for m in self.mean)


def _resize_to_square_if_needed(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  shape = tf.shape(image)
  same = tf.logical_and(shape[0] == size, shape[1] == size)
  out = tf.cond(same, lambda: image, lambda: resize(image, [size, size], method))
  out.set_shape([size, size, 3])
  return out


def train_transform(image_or_bytes: tf.Tensor, seed: tf.Tensor, tc: TransformConfig) -> tf.Tensor:
  """Encoded or decoded image -> float32 (R, R, 3), augmented and normalised."""
  size = tc.image_size
  s_crop, s_flip, s_ra, s_erase = split_seed(seed, 4)
  if tc.is_small and tc.small_image_padding > 0:
    image = _resize_to_square_if_needed(decode_full(image_or_bytes), size, tc.interpolation)
    image = pad_and_random_crop(image, s_crop, size, tc.small_image_padding)
  elif tc.random_resized_crop:
    image = decode_and_random_resized_crop(image_or_bytes, s_crop, size, tc.rrc_scale,
                                           tc.rrc_ratio, tc.interpolation)
  else:
    image = _resize_to_square_if_needed(decode_full(image_or_bytes), size, tc.interpolation)
  image.set_shape([size, size, 3])
  if tc.hflip_prob > 0:
    image = random_flip_left_right(image, s_flip, tc.hflip_prob)
  if tc.randaugment:
    image = rand_augment(image, s_ra, tc.randaugment, tc.fill)
  image = normalize(image, tc.mean, tc.std)
  if tc.random_erasing_prob > 0:
    image = random_erasing(image, s_erase, tc.random_erasing_prob, tc.random_erasing_mode,
                           tc.random_erasing_count)
  image.set_shape([size, size, 3])
  return image


def eval_transform(image_or_bytes: tf.Tensor, tc: TransformConfig) -> tf.Tensor:
  """Encoded or decoded image -> float32 (R, R, 3): resize + center crop, normalise."""
  size = tc.image_size
  image = decode_full(image_or_bytes)
  if tc.is_small or not tc.eval_crop:
    image = _resize_to_square_if_needed(image, size, tc.interpolation)
  else:
    image = eval_resize_and_center_crop(image, size, tc.eval_resize_ratio, tc.interpolation)
  image = normalize(image, tc.mean, tc.std)
  image.set_shape([size, size, 3])
  return image
