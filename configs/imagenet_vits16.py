"""BITS, ViT-S/16 from scratch on ImageNet-1k (TFDS `imagenet2012`): the paper-scale recipe.

  python -m bits_jax.main --config=configs/imagenet_vits16.py:ep100 --workdir=gs://B/vits16 \
      --config.input.data_dir=gs://B/tensorflow_datasets

Presets (`:arg`): ep100 (default) | ep300, the length of the run in epochs.

Recipe: 2 global crops of 224 and 10 local crops of 96 (multi-crop, SimDINO-style
augmentations: the defaults of `config_defaults.input_defaults`), global batch 1024, a 256-bit
channel, coding-rate eps 0.05, student and teacher heads re-initialized together every 10
epochs. Optimization follows DINO's ViT recipe: AdamW, learning rate 5e-4 x batch / 256
after 10 warmup epochs, cosine to 1e-6, weight decay 0.04 -> 0.4, gradient clipping at 3,
teacher momentum 0.996 -> 1. Compute in bfloat16, params and optimizer state in float32.
The backbone has no stochastic depth (DINO uses 0.1 for ViT-S/16).

`imagenet2012` must be prepared in `data_dir` (TFDS needs the manually downloaded archives).
Scale-out keys: `--config.mesh.fsdp=N` (FSDP over N devices),
`--config.optim.grad_accum_steps=K`, `--config.model.remat=True`; see the README's "TPU and multi-GPU runs".
"""

from bits_jax import config_defaults
from configs import common

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def imagenet_config(
    model: str, epochs: int, *, base_lr_per_256: float, teacher_momentum: float = 0.996
):
  """The ImageNet-1k BITS recipe for `model` trained for `epochs` epochs."""
  config = config_defaults.base_config()
  config.seed = 0
  config.dtype = "bfloat16"

  data = config.input
  data.dataset = "imagenet2012"
  data.data_dir = None  # where TFDS imagenet2012 is prepared, e.g. gs://...
  data.train_split = "train"
  data.num_channels = 3
  data.batch_size = 1024
  data.eval_batch_size = 1024
  data.eval_resize_size = 256
  data.eval_crop_size = 224
  data.crops.update(dict(global_size=224, local_size=96, num_global=2, num_local=10))
  for entry in config.evals.values():
    for key in ("query_split", "test_split", "split"):
      if key in entry:
        entry[key] = "validation"

  config.model = dict(name=model, patch_size=16, remat=False)

  config.objective.name = "bits"
  config.objective.bits.num_bits = 256
  config.objective.bits.eps = 0.05
  config.objective.head.update(dict(hidden_dim=2048, bottleneck_dim=256, num_layers=3))

  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // data.batch_size  # 1251
  config.total_steps = epochs * steps_per_epoch
  config.objective.head.reset_every_steps = 10 * steps_per_epoch
  optim = config.optim
  optim.warmup_steps = 10 * steps_per_epoch
  optim.learning_rate = base_lr_per_256 * data.batch_size / 256
  optim.end_learning_rate = 1e-6
  optim.weight_decay = 0.04
  optim.weight_decay_end = 0.4
  optim.clip_norm = 3.0
  optim.teacher_momentum = teacher_momentum

  config.log_every = 100
  config.checkpoint_every = steps_per_epoch
  config.keep_checkpoints = 3
  config.evals.knn.ks = (20,)
  return config


def get_config(arg=None):
  arg = common.parse_arg(arg, length=("ep100", "ep300"))
  return imagenet_config("vit_small", int(arg.length[2:]), base_lr_per_256=5e-4)
