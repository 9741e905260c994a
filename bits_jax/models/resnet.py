"""ResNet-18/50 backbones (torchvision layout), with an optional small-image stem.

Module names follow torchvision's state_dict (`conv1`, `bn1`, `layer1_0/conv1`, ...,
`layer2_0/downsample_conv`, `downsample_bn`) so `bits_jax.models.convert` maps weights
one to one. Convolutions are padded symmetrically as in PyTorch (not 'SAME', which pads
strided convolutions asymmetrically), so converted weights give the same outputs.

BatchNorm: `train=True` normalizes with the batch statistics and updates the running
averages in the mutable `batch_stats` collection; `train=False` uses the running averages.
Under `jax.jit` with the batch sharded over a mesh, the batch mean and variance are reductions
over the global array, so XLA computes them across devices (cross-replica / synchronized
BatchNorm) with no `axis_name`. Running variances use the biased batch variance (PyTorch
stores the unbiased one; the difference is a factor n / (n - 1) on the running estimate).

Returns the same dict as the ViT: 'cls': [batch, width] (global average pool) and
'patch_tokens': [batch, h * w, width] (the last feature map).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

RESNET_SIZES = {
    # name: (block type, blocks per stage)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# He (fan-out) init as in torchvision.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


def _shortcut(x, features: int, stride: int, conv, norm):
  """Identity, or a strided 1x1 conv + BatchNorm where the shape changes (torchvision)."""
  if stride == 1 and x.shape[-1] == features:
    return x
  x = conv(features, (1, 1), strides=stride, padding="VALID", name="downsample_conv")(x)
  return norm(name="downsample_bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs; the stride is in the first."""

  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, norm):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    y = conv(self.features, (3, 3), strides=self.stride, padding=_pad(3), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), padding=_pad(3), name="conv2")(y)
    y = norm(name="bn2")(y)
    return nn.relu(_shortcut(x, self.features, self.stride, conv, norm) + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, the torchvision "v1.5" placement) -> 1x1 (4x features)."""

  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, norm):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    out = self.features * _EXPANSION["bottleneck"]
    y = nn.relu(norm(name="bn1")(conv(self.features, (1, 1), padding="VALID", name="conv1")(x)))
    y = conv(self.features, (3, 3), strides=self.stride, padding=_pad(3), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(out, (1, 1), padding="VALID", name="conv3")(y))
    return nn.relu(_shortcut(x, out, self.stride, conv, norm) + y)


class ResNet(nn.Module):
  """ResNet backbone. `images: [batch, H, W, C]` -> {'cls', 'patch_tokens'}.

  `small_stem=True` replaces the 7x7/2 conv + 3x3/2 max-pool by one 3x3/1 conv (the usual
  CIFAR variant), for 28-64 pixel images.
  """

  block: str  # 'basic' | 'bottleneck'
  stage_sizes: Sequence[int]
  width: int = 64
  small_stem: bool = False
  bn_momentum: float = 0.9  # PyTorch momentum 0.1
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Width of the 'cls' features (the last stage's channels)."""
    return self.width * 2 ** (len(self.stage_sizes) - 1) * _EXPANSION[self.block]

  @nn.compact
  def __call__(self, images, train: bool = False):
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        dtype=self.dtype,
    )
    kernel, stride = (3, 1) if self.small_stem else (7, 2)
    x = nn.Conv(
        self.width,
        (kernel, kernel),
        strides=stride,
        padding=_pad(kernel),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_init,
        name="conv1",
    )(images.astype(self.dtype))
    x = nn.relu(norm(name="bn1")(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, stride, dtype=self.dtype, name=f"layer{i + 1}_{j}")(
            x, norm
        )
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    return {
        "cls": jnp.mean(tokens.astype(jnp.float32), axis=1).astype(self.dtype),
        "patch_tokens": tokens,
    }
