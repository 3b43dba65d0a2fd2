"""Our eval preprocessing vs the official one (torchvision on PIL), on real image files.

The reference is written here with PIL alone (torchvision is not a dependency), as torchvision
computes it: Image.open(f).convert('RGB'); Resize(int(256/224 * R), BICUBIC) (shorter side to
that size, longer side int(size * long / short)); CenterCrop(R) (top = int(round((h - R) / 2)));
ToTensor; Normalize(ImageNet mean/std). Files: the two photos scikit-learn ships, as they are
and cropped/resized to many sizes and aspect ratios, saved as JPEG (4:2:0, 4:2:2, 4:4:4,
progressive, greyscale) and PNG (RGB, RGBA, palette, palette with transparency, greyscale).
"""

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("PIL", minversion="13")  # pil_resize's default pass order is Pillow 13's
from PIL import Image  # noqa: E402

from strip_mlp.data import config as data_config  # noqa: E402
from strip_mlp.data import pil_resize  # noqa: E402
from strip_mlp.data import pipeline as ip  # noqa: E402
from strip_mlp.data import transforms as T  # noqa: E402

SIZES = (
    (427, 640),
    (640, 427),
    (256, 256),
    (224, 300),
    (300, 224),
    (75, 160),
    (160, 75),
    (31, 97),
    (97, 31),
    (400, 150),
    (150, 400),
    (73, 73),
    (73, 90),
    (90, 73),
    (2, 3),
    (1, 1),
)
KINDS = (
    "jpeg",
    "jpeg422",
    "jpeg444",
    "jpeg_progressive",
    "gray_jpeg",
    "png",
    "rgba_png",
    "palette_png",
    "palette_trns_png",
    "gray_png",
)
# The reference's convert('RGB') of a palette PNG with transparency warns; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency")
MEAN = np.asarray(data_config.IMAGENET_MEAN, np.float32)
STD = np.asarray(data_config.IMAGENET_STD, np.float32)


def sample_photos():
  """The photos scikit-learn ships (china.jpg, flower.jpg): paths and RGB arrays (427, 640)."""
  import sklearn.datasets

  folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
  paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
  return paths, [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def derived(photo: np.ndarray, hw, k: int):
  """A crop of `photo` with aspect ratio hw, resized (Lanczos) to hw: a photo-like PIL RGB."""
  h, w = hw
  ph, pw = photo.shape[:2]
  scale = min(ph / h, pw / w)
  ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
  top, left = (k * 37) % (ph - ch + 1), (k * 53) % (pw - cw + 1)
  return Image.fromarray(photo[top : top + ch, left : left + cw]).resize((w, h), Image.LANCZOS)


def save(image, kind: str, path_base: str) -> str:
  """Writes an RGB PIL image as `kind`; returns the path."""
  if "jpeg" in kind:
    options = {
        "jpeg": dict(quality=90),
        "jpeg422": dict(quality=85, subsampling=1),
        "jpeg444": dict(quality=95, subsampling=0),
        "jpeg_progressive": dict(quality=80, progressive=True),
        "gray_jpeg": dict(quality=90),
    }[kind]
    if kind == "gray_jpeg":
      image = image.convert("L")
    path = path_base + ".jpg"
    image.save(path, "JPEG", **options)
    return path
  path = path_base + ".png"
  if kind == "rgba_png":
    alpha = Image.fromarray(
        (np.arange(image.width * image.height) % 256)
        .astype(np.uint8)
        .reshape(image.height, image.width)
    )
    image = image.copy()
    image.putalpha(alpha)
  elif kind == "palette_png":
    image = image.quantize(colors=64)
  elif kind == "palette_trns_png":
    image = image.quantize(colors=32)
    image.info["transparency"] = 3
  elif kind == "gray_png":
    image = image.convert("L")
  image.save(path, "PNG")
  return path


def torchvision_eval(path: str, size: int, ratio: float = 256 / 224):
  """uint8 (R, R, 3) of torchvision's eval transform before ToTensor, with PIL only."""
  image = Image.open(path).convert("RGB")
  w, h = image.size
  if size <= 32:  # the small-image path: Resize((R, R))
    return np.asarray(image.resize((size, size), Image.BICUBIC))
  short = int(ratio * size)
  new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def to_tensor_normalize(image: np.ndarray) -> np.ndarray:
  """torchvision ToTensor + Normalize in float32 (HWC here)."""
  return (image.astype(np.float32) / np.float32(255.0) - MEAN) / STD


@functools.lru_cache(maxsize=None)
def eval_fn(size: int, before: bool = False):
  """File bytes -> (uint8 eval image, normalised float32), as the pipeline computes them
  (eval_transform is normalize(eval_image(...)), with the pipeline's default config).

  before=True: TF's default (fast) IDCT and tf.image.resize bicubic, the earlier pipeline.
  """
  cfg = data_config.default_data_config()
  cfg.image_size = size
  if before:
    cfg.jpeg_dct_method, cfg.interpolation = "", "tf_bicubic"
  tc = ip.transform_config(cfg)

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def fn(data):
    image = T.eval_image(data, tc)
    return image, T.normalize(image, tc.mean, tc.std)

  return fn


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """[(kind, path)]: the shipped photos as they are, then each size in 4 kinds (rotating:
  every kind gets 6-7 sizes)."""
  root = str(tmp_path_factory.mktemp("parity"))
  paths, photos = sample_photos()
  out = [("jpeg", p) for p in paths]
  for i, hw in enumerate(SIZES):
    for j in range(4):
      n = i * 4 + j
      kind = KINDS[n % len(KINDS)]
      image = derived(photos[n % len(photos)], hw, n)
      out.append((kind, save(image, kind, os.path.join(root, f"{kind}_{hw[0]}x{hw[1]}"))))
  return out


def _stats(diffs):
  d = np.concatenate([x.ravel() for x in diffs]).astype(np.float64)
  return d.mean(), np.percentile(d, 99.9), d.max()


@pytest.mark.parametrize("size", [64, 224, 32])
def test_eval_preprocessing_equals_torchvision_on_pil(files, size):
  chosen = files if size == 64 else files[:2] + files[2::3]  # every kind, fewer sizes
  after, before = {}, {}
  for kind, path in chosen:
    data = tf.io.read_file(path)
    ref = torchvision_eval(path, size)
    ours, normalised = (x.numpy() for x in eval_fn(size)(data))
    assert ours.shape == ref.shape == (size, size, 3) and ours.dtype == np.uint8
    after.setdefault(kind, []).append(np.abs(ours.astype(int) - ref.astype(int)))
    old = eval_fn(size, before=True)(data)[0].numpy()
    before.setdefault(kind, []).append(np.abs(old.astype(int) - ref.astype(int)))
    np.testing.assert_allclose(normalised, to_tensor_normalize(ref), rtol=0, atol=1e-6)
  print(
      f"\nR={size}: |ours - torchvision/PIL| in 8-bit levels, mean / 99.9th pct / max "
      f"(before: TF default IDCT + tf.image.resize bicubic; after: this pipeline)"
  )
  for kind in after:
    b, a = _stats(before[kind]), _stats(after[kind])
    print(
        f"  {kind:17s} before {b[0]:.3f} / {b[1]:.0f} / {b[2]:.0f}   "
        f"after {a[0]:.3f} / {a[1]:.0f} / {a[2]:.0f}   ({len(after[kind])} files)"
    )
  b = _stats(sum(before.values(), []))
  a = _stats(sum(after.values(), []))
  print(
      f'  {"all":17s} before {b[0]:.3f} / {b[1]:.0f} / {b[2]:.0f}   '
      f"after {a[0]:.3f} / {a[1]:.0f} / {a[2]:.0f}"
  )
  assert a[2] == 0, a  # bit-exact: mean 0, 99.9th percentile 0, max 0


def test_eval_pipeline_batches_equal_torchvision(files, tmp_path):
  """The folder pipeline end to end (read, decode, resize, crop, normalise, batch)."""
  chosen = files[::7]
  for i, (_, path) in enumerate(chosen):
    for split in ("train", "val"):
      os.makedirs(tmp_path / split / "c", exist_ok=True)
      os.symlink(path, tmp_path / split / "c" / f"{i:03d}{os.path.splitext(path)[1]}")
  cfg = data_config.default_data_config()
  cfg.update(source="folder", folder_root=str(tmp_path), image_size=64)
  batches = ip.create_eval_iterator(cfg, 8, None)
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  refs = np.stack([to_tensor_normalize(torchvision_eval(p, 64)) for _, p in chosen])
  np.testing.assert_allclose(images, refs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_pil_resize_matches_pillow_on_random_sizes(method):
  """Random sizes (up/down, either pass skipped, big factors, 1 px), with and without a crop
  window, in Pillow's own pass order ('auto', Pillow >= 13) and horizontal-first (<= 12)."""
  rng = np.random.default_rng(0)
  resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[method]
  fn = tf.function(
      lambda x, s, w: pil_resize.resize(x, s, method, w),
      input_signature=[
          tf.TensorSpec([None, None, 3], tf.uint8),
          tf.TensorSpec([2], tf.int32),
          tf.TensorSpec([4], tf.int32),
      ],
  )
  old = tf.function(
      lambda x, s: pil_resize.resize(x, s, method, order="horizontal_first"),
      input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32)],
  )
  shapes = [
      ((1, 1), (5, 7)),
      ((9, 1), (1, 1)),
      ((640, 427), (3, 5)),
      ((30, 300), (7, 320)),
      ((300, 30), (20, 31)),
  ]
  shapes += [(tuple(rng.integers(1, 160, 2)), tuple(rng.integers(1, 200, 2))) for _ in range(25)]
  for k, ((h, w), (oh, ow)) in enumerate(shapes):
    oh = h if k % 5 == 1 else oh  # horizontal pass only
    ow = w if k % 5 == 2 else ow  # vertical pass only
    image = np.clip(np.cumsum(rng.normal(0, 40, (h, w, 3)), 1) + 128, 0, 255).astype(np.uint8)
    pil = Image.fromarray(image)
    ref = np.asarray(pil.resize((ow, oh), resample))
    top, left = int(rng.integers(0, oh)), int(rng.integers(0, ow))
    ch, cw = int(rng.integers(1, oh - top + 1)), int(rng.integers(1, ow - left + 1))
    out = fn(image, [oh, ow], [top, left, ch, cw]).numpy()
    np.testing.assert_array_equal(
        out, ref[top : top + ch, left : left + cw], err_msg=str((h, w, oh, ow))
    )
    two_pass = np.asarray(pil.resize((ow, h), resample).resize((ow, oh), resample))
    np.testing.assert_array_equal(old(image, [oh, ow]).numpy(), two_pass)
