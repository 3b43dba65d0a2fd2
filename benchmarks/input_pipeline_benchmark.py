"""Images/s of the host input pipeline alone (no model), folder source, JPEGs written here.

    python benchmarks/input_pipeline_benchmark.py                      # ~1-2 min on 2 cores
    python benchmarks/input_pipeline_benchmark.py --num_images 2000 --seconds 60 --batch_size 128
    python benchmarks/input_pipeline_benchmark.py --preprocessing default,exact,idct,tf  # compare

Writes an ImageNet-style folder of JPEGs (shorter side --source_size, longer side up to 1.33x,
smooth random content so the files are photo-sized) into a temp dir, then times the train
pipeline (fused decode+random-resized-crop, flip, RandAugment m9-mstd0.5-inc1, random
erasing, normalise) and the eval pipeline (decode, resize shorter side to int(R*256/224)
bicubic, center crop, normalise), and prints a markdown table.

--preprocessing picks how JPEGs decode and images resize (each row runs once per choice):
  default: the pipeline's defaults: accurate IDCT; PIL-exact bicubic in eval, tf.image.resize
           bicubic in training,
  exact:   accurate IDCT + PIL-exact bicubic in training too (data.train_pil_resize=True),
  idct:    accurate IDCT + tf.image.resize bicubic everywhere (isolates the IDCT cost),
  tf:      TF's default (fast) IDCT + tf.image.resize bicubic (the pipeline before PIL parity).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402  pylint: disable=g-import-not-at-top

COLUMNS = [
    ("pipeline", "pipeline"),
    ("preprocessing", "preprocessing"),
    ("transforms", "transforms"),
    ("images_per_s", "images/s"),
    ("batch_ms", "ms/batch"),
    ("cpu_ms", "CPU ms/image"),
]


def write_jpeg_folder(
    root: str, num_images: int, source_size: int, num_classes: int, seed: int = 0
) -> float:
  """root/{train,val}/<class>/*.JPEG; returns the mean file size in KiB."""
  import tensorflow as tf

  rng = np.random.default_rng(seed)
  sizes = []
  for split in ("train", "val"):
    for i in range(num_images):
      cls = f"n{i % num_classes:08d}"
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      long_side = int(rng.integers(source_size, int(source_size * 4 / 3) + 1))
      h, w = (source_size, long_side) if rng.random() < 0.7 else (long_side, source_size)
      low = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
      image = tf.image.resize(low[None], [h, w], method="bicubic")[0]
      image += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
      data = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90)
      path = os.path.join(root, split, cls, f"img_{i:06d}.JPEG")
      tf.io.write_file(path, data)
      sizes.append(len(data.numpy()))
  return float(np.mean(sizes)) / 1024


def time_iterator(
    iterator, batch_size: int, seconds: float, warmup: int
) -> tuple[float, float, int]:
  """(images/s, CPU ms per image of this process, batches timed) after `warmup` batches.

  CPU time (all threads) per image is the cost measure that other processes' load on the
  machine disturbs least; images/s is what this machine delivered.
  """
  for _ in range(warmup):
    next(iterator)
  n, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    try:
      next(iterator)
    except StopIteration:
      break
    n += 1
  elapsed = time.perf_counter() - start
  cpu_ms = 1000 * (time.process_time() - cpu_start) / max(1, n * batch_size)
  return n * batch_size / elapsed, cpu_ms, n


PREPROCESSING = {
    "default": {},
    "exact": dict(train_pil_resize=True),
    "idct": dict(jpeg_dct_method="INTEGER_ACCURATE", interpolation="tf_bicubic"),
    "tf": dict(jpeg_dct_method="", interpolation="tf_bicubic"),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=384, help="JPEGs per split")
  parser.add_argument("--source_size", type=int, default=224, help="shorter side of the JPEGs")
  parser.add_argument("--image_size", type=int, default=224, help="R, the model input size")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per row")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches per row")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument(
      "--rows",
      default="train,train_no_randaugment,eval",
      help="comma list of train, train_no_randaugment, train_crop_flip, eval",
  )
  parser.add_argument(
      "--preprocessing",
      default="default",
      help=f'comma list of {", ".join(PREPROCESSING)} (see the module docstring)',
  )
  parser.add_argument("--root", default=None, help="reuse/keep this folder instead of a temp dir")
  args = parser.parse_args(argv)
  choices = args.preprocessing.split(",")
  for choice in choices:
    if choice not in PREPROCESSING:
      parser.error(f'--preprocessing {choice!r}: use a comma list of {", ".join(PREPROCESSING)}')

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from strip_mlp.data import config as data_config
  from strip_mlp.data import pipeline

  tmp = None
  root = args.root
  if root is None:
    tmp = tempfile.TemporaryDirectory(prefix="jpeg_folder_")
    root = tmp.name
  t0 = time.perf_counter()
  if not os.path.isdir(os.path.join(root, "train")):
    kib = write_jpeg_folder(root, args.num_images, args.source_size, args.num_classes)
    print(
        f"wrote 2 x {args.num_images} JPEGs ({kib:.0f} KiB mean, shorter side "
        f"{args.source_size}) in {time.perf_counter() - t0:.1f}s to {root}"
    )

  variants = {
      "train": {},
      "train_no_randaugment": {"randaugment": ""},
      "train_crop_flip": {"randaugment": "", "random_erasing_prob": 0.0},
      "eval": {},
  }
  rows = []
  for row in args.rows.split(","):
    for choice in choices:
      cfg = data_config.default_data_config()
      cfg.update(
          dict(
              source="folder",
              folder_root=root,
              image_size=args.image_size,
              shuffle_buffer=args.num_images,
              **variants[row],
              **PREPROCESSING[choice],
          )
      )
      if row == "eval":  # one pipeline, repeated: time the transforms, not pipeline set-up
        n_batches = pipeline.num_eval_batches(cfg, args.batch_size, process_count=1)
        ds = pipeline.create_eval_dataset(cfg, args.batch_size, n_batches).repeat()
        iterator = ds.as_numpy_iterator()
      else:
        iterator = pipeline.create_train_iterator(cfg, args.batch_size, None, seed=0)
      ips, cpu_ms, n = time_iterator(iterator, args.batch_size, args.seconds, args.warmup)
      rows.append((row, choice, ips, cpu_ms))
      print(
          f"{row} ({choice}): {ips:.0f} images/s, {cpu_ms:.1f} CPU ms/image over {n} batches",
          flush=True,
      )

  described = {
      "train": "decode+RRC (fused), flip, RandAugment m9-mstd0.5-inc1, erasing 0.25, normalise",
      "train_no_randaugment": "decode+RRC (fused), flip, erasing 0.25, normalise",
      "train_crop_flip": "decode+RRC (fused), flip, normalise",
      "eval": f"decode, resize {int(args.image_size * 256 / 224)} bicubic, center crop, normalise",
  }
  table = [
      dict(
          pipeline=row,
          preprocessing=choice,
          transforms=described[row],
          images_per_s=round(ips),
          batch_ms=round(1000 * args.batch_size / ips),
          cpu_ms=round(cpu_ms, 1),
      )
      for row, choice, ips, cpu_ms in rows
  ]
  print()
  print(
      bench_util.machine_header(
          source=f"folder of {args.source_size}-px JPEGs",
          image_size=args.image_size,
          batch_size=args.batch_size,
      )
  )
  print(bench_util.markdown_table(table, COLUMNS), flush=True)
  if tmp is not None:
    tmp.cleanup()
  return table


if __name__ == "__main__":
  main()
