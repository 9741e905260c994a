"""BITS, ViT-B/16 from scratch on ImageNet-1k (TFDS `imagenet2012`): the paper's main runs.

  python -m bits_jax.main --config=configs/imagenet_vitb16.py:reset --workdir=gs://B/vitb16_reset \
      --config.input.data_dir=gs://B/tensorflow_datasets
  python -m bits_jax.main --config=configs/imagenet_vitb16.py:fixed ...    # BITS-fixed
  python -m bits_jax.main --config=configs/imagenet_vitb16.py:dino ...     # the baselines
  python -m bits_jax.main --config=configs/imagenet_vitb16.py:simdino ...

Presets (`:arg`): variant reset (default) | fixed | dino | simdino; length ep100 (default,
the paper's 100 epochs) | ep300.

The paper's Tab. 1 setting (PAPER.md "Training"): ViT-B/16, 100 epochs, global batch 256,
lr 5e-4 x batch / 256 after 10 warm-up epochs, cosine to 5e-5, clip 1.0, drop-path 0.1 on the
student, 2 x 224 crops at scale (0.4, 1) and 96-px local crops at (0.05, 0.4), beta 0.1,
256 bits, heads re-initialised every 10 epochs (`reset`) or never (`fixed`). The recipe and
the source of every value (paper, SimDINO code, DINO, or ours where nobody states it, e.g. the
10 local crops, bfloat16 compute and the head optimizer state at a reset) are in
`configs/imagenet_vits16.py`. Paper results to compare with (Tab. 1, mAP@ALL / k-NN /
linear): DINO 35.68 / 72.39 / 76.3, SimDINO 38.62 / 69.52 / 75.3, BITS-fixed 43.44 / 73.32 /
76.7, BITS-reset 50.64 / 73.5 / 77.8.

86M backbone params fit replicated on any current accelerator; `--config.mesh.fsdp=N` shards
them (and the optimizer state and teacher) over N devices when memory is short,
`--config.model.remat=True` trades compute for activation memory.
"""

from configs import imagenet_vits16


def get_config(arg=None):
  arg = imagenet_vits16.parse(arg)
  return imagenet_vits16.imagenet_config("vit_base", int(arg.length[2:]), arg.variant)
