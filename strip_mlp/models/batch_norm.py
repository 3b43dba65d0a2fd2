"""BatchNorm with PyTorch's running-statistics rule, for NHWC (or (N, C)) inputs.

Training normalises with the biased batch variance, as every BatchNorm does, but updates
the running variance with the *unbiased* one, var * n / (n - 1) with n the elements per
channel: torch's `BatchNorm2d` rule, which the released weights and trainer follow. flax's
`nn.BatchNorm` uses the biased variance for both. Names are flax's ('scale', 'bias' in
params; 'mean', 'var' in batch_stats), so checkpoints and converters are unchanged.

Statistics are over every axis but the last, of the input this module sees. Ghost batch
norm (statistics per group of examples, the released per-GPU batch) is done by the train
step, which vmaps the model over groups (`strip_mlp.train.steps`); under that vmap each call
sees one group, and the step averages the groups' running-statistics updates.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
  """y = (x - mean) * rsqrt(var + eps) * scale + bias over the last axis (C features).

  use_running_average: eval mode (the running statistics normalise, nothing updates).
  momentum: running <- momentum * running + (1 - momentum) * batch (PyTorch's 0.1 is 0.9).
  n == 1 (one value per channel, e.g. a batch of one 1x1 map): torch refuses; here the
  running variance takes the biased batch variance (0) instead of dividing by zero.
  """

  use_running_average: bool | None = None  # or given to __call__ (one of the two)
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    c = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / (n - 1)) if n > 1 else var
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * unbiased
    y = x - mean
    y = y * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y, self.dtype)
