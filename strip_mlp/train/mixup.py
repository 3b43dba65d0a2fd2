"""Mixup / CutMix with label smoothing, pure JAX (jit-able, no TensorFlow), timm 'batch' mode.

One draw per batch: with probability `mix_prob`, CutMix (prob `switch_prob` when both alphas
> 0) or Mixup, lambda ~ Beta(alpha, alpha). The partner of example i is example B-1-i (the
batch reversed, as timm's x.flip(0)). CutMix pastes the partner's box of side
(H, W) * sqrt(1 - lambda) centred uniformly (clipped at the border) and corrects lambda to the
pasted area. Targets: lam * smooth(y) + (1 - lam) * smooth(y_reversed), with smooth(y) =
one_hot * (1 - s) + s / num_classes, so each row sums to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """int (B,) -> float32 (B, num_classes): 1 - s + s/K on the label, s/K elsewhere."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
  """timm rand_bbox: (y0, y1, x0, x1) int32 of a box with sides int(H*sqrt(1-lam)), int(W*...)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    mix_prob: float = 1.0,
):
  """Mixes a batch and returns soft targets.

  Args:
    rng: PRNG key.
    images: (B, H, W, C) float.
    labels: (B,) int class ids.
    num_classes: K.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind (both 0: smoothing only).
    switch_prob: probability of CutMix when both are enabled.
    label_smoothing: s.
    mix_prob: probability of mixing this batch at all.
  Returns:
    (images (B, H, W, C) same dtype, targets float32 (B, K), rows summing to 1).
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or mix_prob <= 0:
    return images, targets
  _, height, width, _ = images.shape
  use_cutmix, lam, box = draw_mix(
      rng, height, width, mixup_alpha, cutmix_alpha, switch_prob, mix_prob
  )
  return apply_mix(images, targets, use_cutmix, lam, box)


def draw_mix(rng, height, width, mixup_alpha, cutmix_alpha, switch_prob, mix_prob):
  """One batch's draw: (use_cutmix bool, lam float32 (1.0: not mixed), box (y0, y1, x0, x1))."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = (
      jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  )
  lam_cut = (
      jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  )
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  lam = jnp.where(jax.random.uniform(k_apply) < mix_prob, lam, 1.0)
  return use_cutmix, lam, cutmix_box(k_box, height, width, lam)


def apply_mix(images, targets, use_cutmix, lam, box):
  """Mixes (B, H, W, C) images and (B, K) targets with the batch reversed as partner.

  use_cutmix: paste the partner's `box` (y0, y1, x0, x1) and weigh the targets by the
  pasted area (timm's correct_lam); else images * lam + partner * (1 - lam).
  """
  _, height, width, _ = images.shape
  y0, y1, x0, x1 = box
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (H, W)
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)

  partner = images[::-1]
  cut_images = jnp.where(inside[None, :, :, None], partner, images)
  mix_images = (
      images.astype(jnp.float32) * lam + partner.astype(jnp.float32) * (1.0 - lam)
  ).astype(images.dtype)
  out = jnp.where(use_cutmix, cut_images, mix_images)
  lam = jnp.where(use_cutmix, lam_box, lam)
  targets = targets * lam + targets[::-1] * (1.0 - lam)
  return out, targets
