"""Projection heads."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class BitsHead(nn.Module):
  """MLP head producing bit logits: `[batch, width] -> [batch, bits]`.

  (num_layers - 1) x (Dense + GELU) of `hidden_dim`, a linear bottleneck, then a linear map
  to one logit per bit. Logits are float32 so thresholding and the losses see full precision.
  """
  bits: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"dense{i}")(x)
      x = nn.gelu(x, approximate=False)
    x = nn.Dense(self.bottleneck_dim, dtype=self.dtype, name="bottleneck")(x)
    x = nn.Dense(self.bits, dtype=jnp.float32, name="logits")(x.astype(jnp.float32))
    return x
