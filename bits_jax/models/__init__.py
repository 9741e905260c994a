"""Backbones and heads, built from config."""
import jax.numpy as jnp
import ml_collections

from bits_jax.models import resnet
from bits_jax.models import vit


def compute_dtype(config: ml_collections.ConfigDict):
  name = config.get("dtype", "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={name!r}: use 'float32' or 'bfloat16'.")
  return jnp.dtype(name)


def build_backbone(config: ml_collections.ConfigDict):
  """The backbone named by `config.model` ('vit_tiny', 'vit_small', 'vit_base', or 'vit'
  with explicit `vit_width`, `vit_depth`, `vit_heads`; 'resnet18' / 'resnet50' with
  `resnet_width` and `resnet_small_stem`)."""
  name = config.model
  if name.startswith("vit"):
    if name == "vit":
      width, depth, heads = config.vit_width, config.vit_depth, config.vit_heads
    else:
      size = name[len("vit_"):]
      if size not in vit.VIT_SIZES:
        raise ValueError(f"Unknown config.model={name!r}: use one of "
                         f"{['vit_' + s for s in vit.VIT_SIZES] + ['vit']}.")
      width, depth, heads = vit.VIT_SIZES[size]
    return vit.ViT(width=width, depth=depth, num_heads=heads, patch_size=config.patch_size,
                   image_size=config.global_crop_size, remat=config.get("remat", False),
                   dtype=compute_dtype(config))
  if name in resnet.RESNET_SIZES:
    block, stages = resnet.RESNET_SIZES[name]
    return resnet.ResNet(block=block, stage_sizes=stages,
                         width=config.get("resnet_width", 64),
                         small_stem=config.get("resnet_small_stem", False),
                         dtype=compute_dtype(config))
  raise ValueError(f"Unknown config.model={name!r}: use 'vit_tiny', 'vit_small', "
                   f"'vit_base', 'vit', 'resnet18' or 'resnet50'.")


def backbone_width(config: ml_collections.ConfigDict) -> int:
  if config.model == "vit":
    return config.vit_width
  if config.model in resnet.RESNET_SIZES:
    return resnet.output_width(config.model, config.get("resnet_width", 64))
  return vit.VIT_SIZES[config.model[len("vit_"):]][0]
