"""BITS, ViT-B/16 from scratch on ImageNet-1k (TFDS `imagenet2012`): the paper's main run.

  python -m bits_jax.main --config=configs/imagenet_vitb16.py:ep100 --workdir=gs://B/vitb16 \
      --config.input.data_dir=gs://B/tensorflow_datasets

Presets (`:arg`): ep100 (default, the paper's 100 epochs) | ep300.

The recipe of `configs/imagenet_vits16.py` (2 x 224 + 10 x 96 crops, batch 1024, 256 bits,
eps 0.05, heads re-initialized every 10 epochs, bfloat16 compute) with a ViT-B/16 backbone
and DINO's ViT-B learning rate, 7.5e-4 x batch / 256. 86M backbone params fit replicated on
any current accelerator; `--config.mesh.fsdp=N` shards them (and the optimizer state and
teacher) over N devices when memory is short, `--config.model.remat=True` trades compute for
activation memory.
"""

from configs import common
from configs import imagenet_vits16


def get_config(arg=None):
  arg = common.parse_arg(arg, length=("ep100", "ep300"))
  return imagenet_vits16.imagenet_config("vit_base", int(arg.length[2:]), base_lr_per_256=7.5e-4)
