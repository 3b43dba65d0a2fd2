"""The embedded digits dataset (strip_mlp.data.digits) through the input pipeline. No mocks."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from data_test_utils import make_cfg  # noqa: E402

from strip_mlp.data import pipeline as ip  # noqa: E402

# configs/default.py's augmentation for the digits (not mirror-symmetric; 32 px).
DIGITS_AUGMENTATION = dict(
    hflip_prob=0.0, randaugment="", random_erasing_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0
)


def test_embedded_digits_dataset(digits_dir):
  from strip_mlp.data import digits

  cfg = make_cfg(data_dir=digits_dir)  # the default: source 'embedded', digits
  info = ip.get_dataset_info(cfg)
  assert (info.name, info.num_classes, info.image_size) == ("digits", 10, 32)
  assert (info.num_train, info.num_eval) == (1438, 359) and info.eval_split == "test"
  a, b = digits.digits_arrays(), digits.digits_arrays()
  np.testing.assert_array_equal(a["test"][1], b["test"][1])  # deterministic split
  assert a["train"][0].shape == (1438, 32, 32, 3) and a["train"][0].dtype == np.uint8
  assert np.bincount(a["test"][1], minlength=10).min() >= 35  # stratified
  batch = next(ip.create_train_iterator(cfg, 16, None, seed=0))  # full recipe augmentation
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() <= batch["label"].max() < 10
  assert np.isfinite(batch["image"]).all()
  # Same TFDS interface by name once prepared.
  assert tfds.builder("digits", data_dir=digits_dir).info.splits["test"].num_examples == 359


def test_embedded_digits_are_learnable(digits_dir):
  """A small MLP trained through the pipeline (pad-crop augmentation) exceeds 90% on 'test'."""
  import optax

  cfg = make_cfg(data_dir=digits_dir, **DIGITS_AUGMENTATION)
  key = jax.random.PRNGKey(0)
  params = {
      "w1": jax.random.normal(key, (32 * 32 * 3, 128)) * 0.01,
      "b1": np.zeros(128, np.float32),
      "w2": jax.random.normal(jax.random.fold_in(key, 1), (128, 10)) * 0.05,
      "b2": np.zeros(10, np.float32),
  }

  def logits(p, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]

  opt = optax.adam(2e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean())(
        p
    )
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  it = ip.create_train_iterator(cfg, 128, None, seed=0)
  for _ in range(60):
    b = next(it)
    params, state = step(params, state, b["image"], b["label"])
  correct = total = 0.0
  for b in ip.create_eval_iterator(cfg, 128, None):
    pred = np.argmax(np.asarray(logits(params, b["image"])), -1)
    correct += float(((pred == b["label"]) * b["mask"]).sum())
    total += float(b["mask"].sum())
  assert total == 359
  assert correct / total > 0.9, correct / total
