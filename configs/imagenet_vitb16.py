"""BITS, ViT-B/16 from scratch on ImageNet-1k (TFDS `imagenet2012`): the paper's main run.

  python -m bits_jax.main --config=configs/imagenet_vitb16.py:ep100 --workdir=gs://B/vitb16 \
      --config.data_dir=gs://B/tensorflow_datasets

Presets (`:arg`): ep100 (default, the paper's 100 epochs) | ep300.

The recipe of `configs/imagenet_vits16.py` (2 x 224 + 10 x 96 crops, batch 1024, 256 bits,
eps 0.05, heads re-initialized every 10 epochs, bfloat16 compute) with a ViT-B/16 backbone
and DINO's ViT-B learning rate, 7.5e-4 x batch / 256. 86M backbone params fit replicated on
any current accelerator; `--config.mesh.fsdp=N` shards them (and the optimizer state and
teacher) over N devices when memory is short, `--config.remat=True` trades compute for
activation memory.
"""
import importlib.util
import os


def _vits16_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_vits16.py")
  spec = importlib.util.spec_from_file_location("imagenet_vits16", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "ep100"):
  recipe = _vits16_module()
  return recipe.imagenet_config("vit_base", recipe.epochs_from_arg(arg, "imagenet_vitb16"),
                                base_lr_per_256=7.5e-4)
