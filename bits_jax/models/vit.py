"""Vision Transformer backbone (pre-norm, CLS token, learned or fixed position embeddings).

Returns a dict so dense evaluation needs no second model:
  'cls': [batch, dim], 'patch_tokens': [batch, h * w, dim],
  'cls_last4': [batch, 4 * dim], the normed CLS tokens of the last 4 blocks concatenated
  (the DINO linear-probe protocol; unused outputs cost nothing under jit).
Position embeddings (`posemb`) are learned ('learn', DINO's and the paper's) or a fixed 2-D
sine-cosine table ('sincos2d', MoCo v3's; no parameter), on a reference grid (the global
crop's) resized bilinearly for crops of another size, so global and local crops share one model.

Attention kernel (`attention`), all softmax(q k^T / sqrt(d)) v: 'xla' is flax's einsum +
softmax; 'cudnn' is `jax.nn.dot_product_attention(implementation='cudnn')`, the fused cuDNN
flash-attention kernel (NVIDIA GPUs, bfloat16/float16 only; the 1 + h * w tokens padded to
even length and masked, as its training kernel requires); 'auto' (default) is 'cudnn' where
it applies and 'xla' elsewhere (CPU, TPU, float32). On an H200 in bf16 cuDNN made the ViT-B/16
train step 1.29x faster (benchmarks/README.md).

Stochastic depth (`drop_path_rate`, DINO / timm): block i of n drops each of its two residual
branches per sample with probability rate * i / (n - 1) and rescales the kept ones by
1 / (1 - p). It acts only in `train=True` applies given a 'drop_path' rng
(`rngs={'drop_path': key}`, the student's); without that rng the forward pass is exact.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bits_jax.models import activations

VIT_SIZES = {
    # name: (width, depth, heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dense (exact erf GELU unless `gelu_approximate`)."""

  hidden_dim: int
  dtype: Any = jnp.float32
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    x = activations.gelu(x, approximate=self.gelu_approximate)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


ATTENTION_KERNELS = ("auto", "xla", "cudnn")


def _fused_attention(
    query, key, value, bias=None, mask=None, *, implementation, pad_to=1, dtype=None, **_
):
  """flax `attention_fn` on `jax.nn.dot_product_attention`; [batch, len, heads, head_dim].

  `pad_to` > 1 pads the sequences to a multiple of it and masks the padding (cuDNN's training
  kernel refuses odd lengths, and a ViT has 1 + h * w tokens). Dropout arguments are ignored:
  the backbone uses no attention dropout.
  """
  length, kv_length = query.shape[1], key.shape[1]
  seq_lengths = {}
  if pad_to > 1 and (length % pad_to or kv_length % pad_to):
    if bias is not None or mask is not None:
      raise ValueError("padded fused attention takes no bias or mask.")
    pad = lambda x: jnp.pad(x, ((0, 0), (0, -x.shape[1] % pad_to), (0, 0), (0, 0)))
    query, key, value = pad(query), pad(key), pad(value)
    batch = query.shape[0]
    seq_lengths = dict(
        query_seq_lengths=jnp.full((batch,), length, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), kv_length, jnp.int32),
    )
  out = jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=mask, implementation=implementation, **seq_lengths
  )[:, :length]
  return out if dtype is None else out.astype(dtype)


def _cudnn_applies(backend: str, device_kind: str, dtype) -> bool:
  """Whether the 'auto' kernel is cuDNN's: an NVIDIA GPU and 16-bit inputs."""
  return (
      backend == "gpu"
      and device_kind.upper().startswith("NVIDIA")
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  )


def _cudnn_attention(query, key, value, bias=None, mask=None, **kwargs):
  return _fused_attention(
      query, key, value, bias, mask, implementation="cudnn", pad_to=2, dtype=kwargs.get("dtype")
  )


def _auto_attention(query, key, value, bias=None, mask=None, **kwargs):
  device = jax.devices()[0]
  if (
      bias is None
      and mask is None
      and _cudnn_applies(jax.default_backend(), device.device_kind, query.dtype)
  ):
    return _cudnn_attention(query, key, value, **kwargs)
  return nn.dot_product_attention(query, key, value, bias, mask, **kwargs)


def attention_fn(kernel: str):
  """The flax `attention_fn` of `config.model.attention` (see the module doc)."""
  kernels = {"xla": nn.dot_product_attention, "cudnn": _cudnn_attention, "auto": _auto_attention}
  if kernel not in kernels:
    raise ValueError(f"config.model.attention={kernel!r}: use one of {ATTENTION_KERNELS}.")
  return kernels[kernel]


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """`x: [batch, ...]` with whole samples zeroed with probability `rate`, the rest / (1 - rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class EncoderBlock(nn.Module):
  """Pre-norm block: x + Attn(LN(x)); x + MLP(LN(x)).

  `drop_path_rate` > 0 drops each residual branch per sample (needs a 'drop_path' rng); the
  ViT passes 0 when stochastic depth is off for the call.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  gelu_approximate: bool = False
  drop_path_rate: float = 0.0
  attention: str = "auto"

  def _residual(self, y):
    if not self.drop_path_rate:
      return y
    return drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dtype=self.dtype,
        attention_fn=attention_fn(self.attention),
        name="attn",
    )(y, y)
    x = x + self._residual(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    y = MlpBlock(
        int(x.shape[-1] * self.mlp_ratio),
        dtype=self.dtype,
        gelu_approximate=self.gelu_approximate,
        name="mlp",
    )(y)
    return x + self._residual(y)


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.0):
  """Fixed 2-D sine-cosine position embedding (MoCo v3), `[1, h * w, dim]`, dim % 4 == 0.

  A quarter of the channels each: sin and cos of the column, sin and cos of the row, at
  frequencies temperature^(-k / (dim / 4 - 1)), k = 0 .. dim / 4 - 1.
  """
  if dim % 4:
    raise ValueError(f"posemb='sincos2d' needs config.model.width divisible by 4, got {dim}.")
  quarter = dim // 4
  freqs = temperature ** -(jnp.arange(quarter, dtype=jnp.float32) / max(quarter - 1, 1))
  rows, cols = jnp.meshgrid(
      jnp.arange(grid[0], dtype=jnp.float32), jnp.arange(grid[1], dtype=jnp.float32), indexing="ij"
  )
  cols = cols.reshape(-1, 1) * freqs
  rows = rows.reshape(-1, 1) * freqs
  embed = jnp.concatenate([jnp.sin(cols), jnp.cos(cols), jnp.sin(rows), jnp.cos(rows)], axis=1)
  return embed[None]


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """`pos_embed: [1, H0 * W0, dim]` (square reference grid) -> [1, h * w, dim]."""
  n, dim = pos_embed.shape[1], pos_embed.shape[2]
  side = int(round(n**0.5))
  if (side, side) == tuple(grid):
    return pos_embed
  grid_embed = pos_embed.reshape(1, side, side, dim)
  grid_embed = jax.image.resize(grid_embed, (1, grid[0], grid[1], dim), method="bilinear")
  return grid_embed.reshape(1, grid[0] * grid[1], dim)


class ViT(nn.Module):
  """ViT backbone. Input `images: [batch, H, W, C]` with H, W divisible by `patch_size`."""

  width: int
  depth: int
  num_heads: int
  patch_size: int
  image_size: int  # reference size for the learned position embeddings
  mlp_ratio: float = 4.0
  remat: bool = False
  dtype: Any = jnp.float32
  # tanh GELU instead of the exact erf one (the paper's / timm's models use erf).
  gelu_approximate: bool = False
  # Stochastic depth of the last block (0 at the first, linear in between); see the module doc.
  drop_path_rate: float = 0.0
  # Attention kernel: 'auto' | 'xla' | 'cudnn' (see the module doc).
  attention: str = "auto"
  # Position embedding: 'learn' (the paper's / DINO's) | 'sincos2d' (fixed, MoCo v3).
  posemb: str = "learn"

  @property
  def feature_dim(self) -> int:
    """Width of the 'cls' features."""
    return self.width

  @nn.compact
  def __call__(self, images, train: bool = False):
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"config.model.drop_path_rate={self.drop_path_rate}: use a rate in [0, 1).")
    # Only the student's train-mode apply gets a 'drop_path' rng; teacher and evaluation don't.
    drop_path_on = train and self.drop_path_rate > 0 and self.has_rng("drop_path")
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
          f"Image size {h}x{w} is not divisible by patch_size {p}: choose crop sizes that "
          "are multiples of the patch size (config.input.crops.global_size / local_size) or "
          "another config.model.patch_size."
      )
    if self.image_size % p:
      raise ValueError(
          f"config.input.crops.global_size={self.image_size} is not divisible by patch_size={p}."
      )
    x = nn.Conv(
        self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed"
    )(images.astype(self.dtype))
    grid = (h // p, w // p)
    x = x.reshape(b, grid[0] * grid[1], self.width)
    ref = self.image_size // p
    # Both on the reference grid, resized for other crops: a smaller crop's tokens sit
    # between the global ones.
    if self.posemb == "learn":
      pos_embed = self.param(
          "pos_embed", nn.initializers.normal(0.02), (1, ref * ref, self.width), jnp.float32
      )
    elif self.posemb == "sincos2d":
      pos_embed = sincos_pos_embed_2d((ref, ref), self.width)
    else:
      raise ValueError(f"config.model.posemb={self.posemb!r}: use 'learn' or 'sincos2d'.")
    cls_token = self.param(
        "cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), jnp.float32
    )
    x = x + resize_pos_embed(pos_embed, grid).astype(self.dtype)
    cls = jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    block_cls = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    block_cls_tokens = []
    for i in range(self.depth):
      rate = self.drop_path_rate * i / (self.depth - 1) if drop_path_on and self.depth > 1 else 0.0
      x = block_cls(
          self.num_heads,
          self.mlp_ratio,
          dtype=self.dtype,
          gelu_approximate=self.gelu_approximate,
          drop_path_rate=rate,
          attention=self.attention,
          name=f"block{i}",
      )(x)
      block_cls_tokens.append(x[:, 0])
    norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
    x = norm(x)
    last4 = jnp.concatenate([norm(t) for t in block_cls_tokens[-4:]], axis=-1)
    return {"cls": x[:, 0], "patch_tokens": x[:, 1:], "cls_last4": last4}
