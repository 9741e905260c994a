"""The backbone registry: `config.model.name` -> a linen Module built from `config.model`.

Each entry is a module class and the fields the name fixes (e.g. `vit_small` fixes width,
depth and heads); every other dataclass field of the class may be set from `config.model`
(`--config.model.patch_size=8`, `--config.model.remat=True`). The reference image size of
position embeddings is the global crop size and the compute dtype is `config.dtype`.
Adding a backbone is one `BACKBONES` entry.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bits_jax.models import resnet
from bits_jax.models import vit

_AUTOMATIC_FIELDS = ("parent", "name", "image_size", "dtype")

BACKBONES: dict[str, tuple[type[nn.Module], dict]] = {
    "vit": (vit.ViT, {}),  # width, depth, num_heads from config.model
    **{
        f"vit_{size}": (vit.ViT, dict(zip(("width", "depth", "num_heads"), dims)))
        for size, dims in vit.VIT_SIZES.items()
    },
    **{
        name: (resnet.ResNet, dict(block=block, stage_sizes=stages))
        for name, (block, stages) in resnet.RESNET_SIZES.items()
    },
}


def compute_dtype(config: ml_collections.ConfigDict):
  name = config.get("dtype", "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={name!r}: use 'float32' or 'bfloat16'.")
  return jnp.dtype(name)


def model_options(name: str) -> list[str]:
  """The `config.model` keys the backbone `name` accepts (besides `name`)."""
  cls, fixed = _entry(name)
  return [
      f.name
      for f in dataclasses.fields(cls)
      if f.name not in _AUTOMATIC_FIELDS and f.name not in fixed
  ]


def _entry(name: str):
  if name not in BACKBONES:
    raise ValueError(f"Unknown config.model.name={name!r}: use one of {sorted(BACKBONES)}.")
  return BACKBONES[name]


def build_backbone(config: ml_collections.ConfigDict) -> nn.Module:
  """The backbone of `config.model` (ValueError naming the key for an unknown option)."""
  name = config.model.name
  cls, fixed = _entry(name)
  options = {k: v for k, v in config.model.items() if k != "name"}
  unknown = sorted(set(options) - set(model_options(name)))
  if unknown:
    message = f"config.model.{unknown[0]} is not an option of {name!r}: use {model_options(name)}."
    if any(unknown[0] in model_options(other) for other in BACKBONES):
      # `--config.model.name=X` keeps the file's other backbone's options (none can be removed
      # from the command line).
      message += (
          " The model section holds another backbone's options: choose the backbone in the "
          "config file or its preset (e.g. configs/fashion_mnist.py:resnet18), not with "
          "--config.model.name alone."
      )
    raise ValueError(message)
  kwargs = dict(fixed, **options, dtype=compute_dtype(config))
  if "image_size" in {f.name for f in dataclasses.fields(cls)}:
    kwargs["image_size"] = config.input.crops.global_size
  try:
    return cls(**kwargs)
  except TypeError as e:  # a required field (e.g. 'vit' without width) is missing
    raise ValueError(f"config.model for {name!r}: {e}; set it in config.model.") from e


def feature_dim(config: ml_collections.ConfigDict) -> int:
  """Width of the backbone's 'cls' features."""
  return build_backbone(config).feature_dim
