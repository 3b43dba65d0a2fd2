"""Per-example tf.image transforms of the published Strip-MLP recipe (timm semantics).

All random ops are *stateless*: each takes a `seed`, an int32/int64 tensor of shape (2,),
so one (seed, example position) always gives the same output. Images are HWC.

Train (R > 32):  decode+random-resized-crop (fused for JPEG) -> resize R bicubic -> hflip
                 -> RandAugment (uint8) -> /255, normalise -> random erasing (float).
Train (R <= 32): decode -> pad 4 + random crop R -> hflip -> RandAugment -> normalise -> erase.
Eval  (R > 32):  decode -> resize shorter side to int(R * 256/224) bicubic -> center crop R.
Eval  (R <= 32): decode -> (resize to R x R only if needed) -> normalise.

Like the official PyTorch pipeline (PIL + torchvision): JPEGs decode with libjpeg's accurate
integer IDCT (PIL's default; TF's default is the fast one), and 'bicubic'/'bilinear' resizing
is PIL's Image.resize bit for bit (strip_mlp.data.pil_resize), so the eval input equals
torchvision's exactly (tests/test_pil_parity.py). Training resizes with tf.image.resize
(antialiased bicubic, ~0.1 level from PIL's) unless train_pil_resize: the exact resize costs
~2 ms more CPU per image there. RandAugment's geometric ops sample bilinearly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf

from strip_mlp.data import pil_resize
from strip_mlp.data.config import (
    DEFAULT_RANDAUGMENT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JPEG_DCT_METHOD,
    JPEG_DCT_METHODS,
)
from strip_mlp.data.erasing import random_erasing
from strip_mlp.data.rand_augment import rand_augment, randint_inclusive, split_seed, uniform

# ----------------------------------------------------------------------------- rng

# ----------------------------------------------------------------------------- decoding


def decode_image(encoded: tf.Tensor, dct_method: str = JPEG_DCT_METHOD) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes (scalar string) to uint8 (H, W, 3).

  JPEGs go to decode_jpeg with `dct_method` (tf.io.decode_image has no such argument); grey
  images are replicated to RGB and alpha is dropped, as PIL's convert('RGB').
  """
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=dct_method),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )
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


def decode_and_crop(
    image_or_bytes: tf.Tensor,
    crop_fn: Callable[[tf.Tensor], tf.Tensor],
    dct_method: str = JPEG_DCT_METHOD,
) -> tf.Tensor:
  """Decodes and crops in one step; JPEGs only decode the crop (decode_and_crop_jpeg).

  Args:
    image_or_bytes: scalar string (encoded image) or a decoded (H, W, C) image.
    crop_fn: maps the image shape (H, W) int32 to a crop window [top, left, h, w] int32.
    dct_method: JPEG IDCT, see decode_image.
  Returns:
    uint8 (h, w, 3).
  """
  if image_or_bytes.dtype != tf.string:
    image = _as_uint8_rgb(image_or_bytes)
    window = crop_fn(tf.shape(image)[:2])
    return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_or_bytes)
    window = crop_fn(shape[:2])
    return tf.image.decode_and_crop_jpeg(image_or_bytes, window, channels=3, dct_method=dct_method)

  def other():
    image = decode_image(image_or_bytes, dct_method)
    window = crop_fn(tf.shape(image)[:2])
    return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

  out = tf.cond(tf.io.is_jpeg(image_or_bytes), jpeg, other)
  out.set_shape([None, None, 3])
  return out


def decode_full(image_or_bytes: tf.Tensor, dct_method: str = JPEG_DCT_METHOD) -> tf.Tensor:
  """Decodes (or passes through) a whole image as uint8 (H, W, 3)."""
  if image_or_bytes.dtype != tf.string:
    return _as_uint8_rgb(image_or_bytes)
  return decode_image(image_or_bytes, dct_method)


# ----------------------------------------------------------------------------- geometry


def _tf_resize(image: tf.Tensor, size_hw, method: str) -> tf.Tensor:
  """tf.image.resize -> uint8: antialiased when shrinking either axis, else plain (4x faster)."""
  image_f = tf.cast(image, tf.float32)
  size_hw = tf.cast(size_hw, tf.int32)
  shrink = tf.reduce_any(size_hw < tf.shape(image)[:2])
  out = tf.cond(
      shrink,
      lambda: tf.image.resize(image_f, size_hw, method=method, antialias=True),
      lambda: tf.image.resize(image_f, size_hw, method=method, antialias=False),
  )
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, size_hw, method: str = "bicubic", window=None) -> tf.Tensor:
  """Resizes a uint8 (H, W, 3) image to size_hw (h, w) -> uint8.

  'bicubic' and 'bilinear' are PIL's Image.resize exactly (strip_mlp.data.pil_resize); any other
  tf.image.resize method ('area', 'nearest', 'lanczos3', ...), or 'tf_<method>' (e.g.
  'tf_bicubic', the earlier behaviour), uses tf.image.resize. `window` = [top, left, ch, cw]
  crops the (h, w) result (PIL resizes compute only the window) -> uint8 (ch, cw, 3).
  """
  if method in pil_resize.FILTERS:
    return pil_resize.resize(image, size_hw, method, window)
  out = _tf_resize(image, size_hw, method[3:] if method.startswith("tf_") else method)
  if window is not None:
    window = tf.cast(window, tf.int32)
    out = out[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
  return out


def random_resized_crop_window(
    shape_hw: tf.Tensor,
    seed: tf.Tensor,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    attempts: int = 10,
) -> tf.Tensor:
  """timm RandomResizedCrop.get_params: [top, left, h, w] int32 of a random crop window.

  Ten vectorised attempts of area ~ U(scale) * H * W and log-uniform aspect ratio; the first
  one that fits wins, otherwise a central crop clamped to `ratio`.
  """
  height = tf.cast(shape_hw[0], tf.float32)
  width = tf.cast(shape_hw[1], tf.float32)
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  area = height * width
  target_area = uniform(s_area, [attempts], scale[0], scale[1]) * area
  log_ratio = uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  w = tf.round(tf.sqrt(target_area * aspect))
  h = tf.round(tf.sqrt(target_area / aspect))
  ok = tf.logical_and(w <= width, h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  any_ok = tf.reduce_any(ok)
  h_sel = tf.cast(h[first], tf.int32)
  w_sel = tf.cast(w[first], tf.int32)
  top = randint_inclusive(uniform(s_top), tf.cast(height, tf.int32) - h_sel)
  left = randint_inclusive(uniform(s_left), tf.cast(width, tf.int32) - w_sel)

  # Fallback: central crop with the aspect ratio clamped into `ratio`.
  in_ratio = width / height
  fw = tf.where(
      in_ratio < min(ratio),
      width,
      tf.where(in_ratio > max(ratio), tf.round(height * max(ratio)), width),
  )
  fh = tf.where(in_ratio < min(ratio), tf.round(width / min(ratio)), height)
  fh, fw = tf.cast(fh, tf.int32), tf.cast(fw, tf.int32)
  ftop = (tf.cast(height, tf.int32) - fh) // 2
  fleft = (tf.cast(width, tf.int32) - fw) // 2
  return tf.where(any_ok, tf.stack([top, left, h_sel, w_sel]), tf.stack([ftop, fleft, fh, fw]))


def decode_and_random_resized_crop(
    image_or_bytes: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    method: str = "bicubic",
    dct_method: str = JPEG_DCT_METHOD,
) -> tf.Tensor:
  """Fused decode + random-resized-crop -> uint8 (size, size, 3)."""
  crop = decode_and_crop(
      image_or_bytes, lambda hw: random_resized_crop_window(hw, seed, scale, ratio), dct_method
  )
  return resize(crop, [size, size], method)


def pad_and_random_crop(
    image: tf.Tensor, seed: tf.Tensor, size: int, padding: int = 4
) -> tf.Tensor:
  """torchvision RandomCrop(size, padding): zero-pad `padding` px, random size x size crop."""
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  shape = tf.shape(image)
  s_top, s_left = split_seed(seed, 2)
  top = randint_inclusive(uniform(s_top), shape[0] - size)
  left = randint_inclusive(uniform(s_left), shape[1] - size)
  out = image[top : top + size, left : left + size]
  out.set_shape([size, size, 3])
  return out


def resize_and_random_crop(
    image: tf.Tensor, seed: tf.Tensor, size: int, resize_ratio: float, method: str
) -> tf.Tensor:
  """torchvision Resize(int(size * resize_ratio)) + RandomCrop(size): shorter side resized
  (aspect kept), then a uniformly placed size x size crop -> uint8 (size, size, 3)."""
  shape = tf.shape(image)
  new_h, new_w = eval_resize_shape(shape[0], shape[1], size, resize_ratio)
  s_top, s_left = split_seed(seed, 2)
  top = randint_inclusive(uniform(s_top), new_h - size)
  left = randint_inclusive(uniform(s_left), new_w - size)
  out = resize(image, tf.stack([new_h, new_w]), method, tf.stack([top, left, size, size]))
  out.set_shape([size, size, 3])
  return out


def random_flip_left_right(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  """Horizontal flip with probability `prob`."""
  return tf.cond(uniform(seed) < prob, lambda: tf.reverse(image, axis=[1]), lambda: image)


def eval_resize_shape(height, width, size: int, resize_ratio: float = 256 / 224):
  """torchvision Resize(int(size * ratio)): shorter side -> int(size*ratio), aspect kept."""
  short = tf.constant(int(size * resize_ratio), tf.int64)
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  new_h = tf.where(height <= width, short, (short * height) // width)
  new_w = tf.where(height <= width, (short * width) // height, short)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def _center_crop_offsets(height, width, size: int):
  """torchvision CenterCrop: top = int(round((H - size) / 2)) (round half to even), left alike."""
  top = tf.cast(tf.round(tf.cast(height - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(width - size, tf.float32) / 2.0), tf.int32)
  return top, left


def eval_resize_and_center_crop(
    image: tf.Tensor, size: int, resize_ratio: float = 256 / 224, method: str = "bicubic"
) -> tf.Tensor:
  """Resize shorter side to int(size * resize_ratio), then center crop size -> uint8.

  Only the crop is computed (PIL resizes: the same bytes as resizing all, then cropping).
  """
  shape = tf.shape(image)
  new_h, new_w = eval_resize_shape(shape[0], shape[1], size, resize_ratio)
  top, left = _center_crop_offsets(new_h, new_w, size)
  out = resize(image, tf.stack([new_h, new_w]), method, tf.stack([top, left, size, size]))
  out.set_shape([size, size, 3])
  return out


def normalize(image: tf.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tf.Tensor:
  """uint8 [0, 255] -> float32 (x / 255 - mean) / std (as one multiply-add)."""
  scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  return tf.cast(image, tf.float32) * scale + offset


# ----------------------------------------------------------------------------- random erasing

# ----------------------------------------------------------------------------- full transforms


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """Everything the per-example transforms need (built from the data ConfigDict)."""

  image_size: int
  interpolation: str = "bicubic"
  random_resized_crop: bool = True
  resize_random_crop: bool = False
  rrc_scale: tuple = (0.08, 1.0)
  rrc_ratio: tuple = (3 / 4, 4 / 3)
  small_image_size: int = 32
  small_image_padding: int = 4
  hflip_prob: float = 0.5
  randaugment: str | None = DEFAULT_RANDAUGMENT
  random_erasing_prob: float = 0.25
  random_erasing_mode: str = "pixel"
  random_erasing_count: int = 1
  eval_crop: bool = True
  eval_resize_ratio: float = 256 / 224
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  jpeg_dct_method: str = JPEG_DCT_METHOD
  train_pil_resize: bool = False

  def __post_init__(self):
    if self.jpeg_dct_method not in JPEG_DCT_METHODS:
      raise ValueError(
          f"data.jpeg_dct_method={self.jpeg_dct_method!r}: use 'INTEGER_ACCURATE' "
          "(PIL's), 'INTEGER_FAST' or '' (TF's default)"
      )

  @property
  def train_interpolation(self) -> str:
    """Training resizes with tf.image.resize unless train_pil_resize: PIL-exact costs ~2 ms
    more CPU per image (+35% for the full recipe) and augmentation swamps its ~0.1 level."""
    if self.train_pil_resize or self.interpolation not in pil_resize.FILTERS:
      return self.interpolation
    return "tf_" + self.interpolation

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
    image = decode_full(image_or_bytes, tc.jpeg_dct_method)
    image = _resize_to_square_if_needed(image, size, tc.train_interpolation)
    image = pad_and_random_crop(image, s_crop, size, tc.small_image_padding)
  elif tc.resize_random_crop:
    image = decode_full(image_or_bytes, tc.jpeg_dct_method)
    image = resize_and_random_crop(
        image, s_crop, size, tc.eval_resize_ratio, tc.train_interpolation
    )
  elif tc.random_resized_crop:
    image = decode_and_random_resized_crop(
        image_or_bytes,
        s_crop,
        size,
        tc.rrc_scale,
        tc.rrc_ratio,
        tc.train_interpolation,
        tc.jpeg_dct_method,
    )
  else:
    image = decode_full(image_or_bytes, tc.jpeg_dct_method)
    image = _resize_to_square_if_needed(image, size, tc.train_interpolation)
  image.set_shape([size, size, 3])
  if tc.hflip_prob > 0:
    image = random_flip_left_right(image, s_flip, tc.hflip_prob)
  if tc.randaugment:
    image = rand_augment(image, s_ra, tc.randaugment, tc.fill)
  image = normalize(image, tc.mean, tc.std)
  if tc.random_erasing_prob > 0:
    image = random_erasing(
        image, s_erase, tc.random_erasing_prob, tc.random_erasing_mode, tc.random_erasing_count
    )
  image.set_shape([size, size, 3])
  return image


def eval_image(image_or_bytes: tf.Tensor, tc: TransformConfig) -> tf.Tensor:
  """Encoded or decoded image -> uint8 (R, R, 3): resize + center crop (before normalising).

  With the defaults this is torchvision's Resize(int(R * 256/224), BICUBIC) + CenterCrop(R) of
  PIL's Image.open(f).convert('RGB'), byte for byte.
  """
  size = tc.image_size
  image = decode_full(image_or_bytes, tc.jpeg_dct_method)
  if tc.is_small or not tc.eval_crop:
    image = _resize_to_square_if_needed(image, size, tc.interpolation)
  else:
    image = eval_resize_and_center_crop(image, size, tc.eval_resize_ratio, tc.interpolation)
  image.set_shape([size, size, 3])
  return image


def eval_transform(image_or_bytes: tf.Tensor, tc: TransformConfig) -> tf.Tensor:
  """Encoded or decoded image -> float32 (R, R, 3): eval_image, normalised."""
  image = normalize(eval_image(image_or_bytes, tc), tc.mean, tc.std)
  image.set_shape([tc.image_size, tc.image_size, 3])
  return image
