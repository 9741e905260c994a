"""Projection heads."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bits_jax import utils
from bits_jax.models import activations

# The bottleneck of DINO and SimDINO heads when `objective.head.bottleneck_dim` is 0.
DEFAULT_BOTTLENECK = 256


def _trunc_normal(stddev: float = 0.02):
  return nn.initializers.truncated_normal(stddev)


class BitsHead(nn.Module):
  """MLP head producing bit logits: `[batch, width] -> [batch, bits]` float32.

  `bottleneck_dim=0` is the paper's head, DINO's three-layer MLP without prototypes:
  (num_layers - 1) x (Dense `hidden_dim` + GELU), then Dense to one logit per bit
  (d -> 2048 -> 2048 -> 256). `bottleneck_dim > 0` inserts a linear `bottleneck` before the
  logits (the first landing's head). Kernels truncated-normal(0.02), biases zero, so every
  re-initialisation draws from the same distribution. Logits are float32 so thresholding
  and the losses see full precision.
  """

  bits: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 0
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.bottleneck_dim:
      x = mlp_layers(
          x, self.bottleneck_dim, self.hidden_dim, self.num_layers, self.dtype, _trunc_normal()
      )
    else:
      x = hidden_layers(x, self.hidden_dim, self.num_layers - 1, self.dtype, _trunc_normal())
    return nn.Dense(self.bits, dtype=jnp.float32, kernel_init=_trunc_normal(), name="logits")(
        x.astype(jnp.float32)
    )


def hidden_layers(x, hidden_dim: int, num: int, dtype, kernel_init):
  """`num` x (Dense `dense{i}` + GELU); call inside a compact method (caller's param names)."""
  for i in range(num):
    x = nn.Dense(hidden_dim, dtype=dtype, kernel_init=kernel_init, name=f"dense{i}")(x)
    x = activations.gelu(x)
  return x


def mlp_layers(x, out_dim: int, hidden_dim: int, num_layers: int, dtype, kernel_init):
  """(num_layers - 1) x (Dense `dense{i}` + GELU), then Dense `bottleneck` to `out_dim`.

  Call inside a compact method: the layers are submodules of the caller (same param names).
  """
  x = hidden_layers(x, hidden_dim, num_layers - 1, dtype, kernel_init)
  return nn.Dense(out_dim, dtype=dtype, kernel_init=kernel_init, name="bottleneck")(x)


class ProjectionMLP(nn.Module):
  """`[batch, width] -> [batch, out_dim]`: (num_layers - 1) x (Dense + GELU), then Dense.

  Kernels are truncated-normal(0.02), biases zero (the DINO recipe).
  """

  out_dim: int
  hidden_dim: int = 2048
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return mlp_layers(
        x, self.out_dim, self.hidden_dim, self.num_layers, self.dtype, _trunc_normal()
    )


class WeightNormDense(nn.Module):
  """Bias-free Dense with weight normalization: `W[:, j] = g_j * v[:, j] / ||v[:, j]||`.

  `scale_g` is fixed to 1 (not a parameter) when `learn_scale=False` (DINO's
  `norm_last_layer=True`), so every prototype has unit norm.
  """

  features: int
  learn_scale: bool = False

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel_v", _trunc_normal(), (x.shape[-1], self.features), jnp.float32)
    w = v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=0, keepdims=True), 1e-24))
    if self.learn_scale:
      w = w * self.param("scale_g", nn.initializers.ones, (self.features,), jnp.float32)
    return jnp.matmul(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


class DinoHead(nn.Module):
  """DINO head: MLP to a bottleneck, L2 normalization, weight-normalized prototypes.

  `[batch, width] -> [batch, out_dim]` float32 prototype scores (logits before the
  temperature). The last layer is named `last_layer` so the train step can freeze it.
  """

  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ProjectionMLP(
        self.bottleneck_dim, self.hidden_dim, self.num_layers, self.dtype, name="mlp"
    )(x)
    x = utils.l2_normalize(x.astype(jnp.float32))
    return WeightNormDense(self.out_dim, learn_scale=not self.norm_last_layer, name="last_layer")(x)


class SimDinoHead(nn.Module):
  """SimDINO head: the DINO MLP without prototypes. `[batch, width] -> [batch, dim]` float32.

  The output is not normalized here; the loss L2-normalizes it.
  """

  dim: int = 256
  hidden_dim: int = 2048
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ProjectionMLP(self.dim, self.hidden_dim, self.num_layers, self.dtype, name="mlp")(x)
    return x.astype(jnp.float32)
