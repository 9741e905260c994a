"""BITS, ViT-S/16 from scratch on ImageNet-1k (TFDS `imagenet2012`): the paper-scale recipe.

  python -m bits_jax.main --config=configs/imagenet_vits16.py:ep100 --workdir=gs://B/vits16 \
      --config.data_dir=gs://B/tensorflow_datasets

Presets (`:arg`): ep100 (default) | ep300, the length of the run in epochs.

Recipe: 2 global crops of 224 and 10 local crops of 96 (multi-crop, SimDINO-style
augmentations: the defaults of `bits_jax/data/pipeline.py`), global batch 1024, a 256-bit
channel, coding-rate eps 0.05, student and teacher heads re-initialized together every 10
epochs. Optimization follows DINO's ViT recipe: AdamW, learning rate 5e-4 x batch / 256
after 10 warmup epochs, cosine to 1e-6, weight decay 0.04 -> 0.4, gradient clipping at 3,
teacher momentum 0.996 -> 1. Compute in bfloat16, params and optimizer state in float32.
The backbone has no stochastic depth (DINO uses 0.1 for ViT-S/16).

`imagenet2012` must be prepared in `data_dir` (TFDS needs the manually downloaded archives).
Scale-out keys: `--config.mesh.fsdp=N` (FSDP over N devices), `--config.grad_accum_steps=K`,
`--config.remat=True`; see the README's "TPU and multi-GPU runs".
"""
from bits_jax import config_defaults

IMAGENET_TRAIN_EXAMPLES = 1_281_167
_EPOCHS = {"ep100": 100, "ep300": 300}


def imagenet_config(model: str, epochs: int, *, base_lr_per_256: float,
                    teacher_momentum: float = 0.996):
  """The ImageNet-1k BITS recipe for `model` trained for `epochs` epochs."""
  config = config_defaults.base_config()
  config.dataset = "imagenet2012"
  config.data_dir = None              # where TFDS imagenet2012 is prepared, e.g. gs://...
  config.train_split = "train"
  config.test_split = "validation"
  config.bank_split = "train"
  config.num_channels = 3
  config.seed = 0

  config.global_crop_size = 224
  config.local_crop_size = 96
  config.num_global_crops = 2
  config.num_local_crops = 10
  config.eval_resize_size = 256
  config.eval_crop_size = 224

  config.model = model
  config.patch_size = 16
  config.dtype = "bfloat16"
  config.remat = False

  config.method = "bits"
  config.bits = 256
  config.coding_rate_eps = 0.05
  config.head_hidden_dim = 2048
  config.head_bottleneck_dim = 256
  config.head_layers = 3

  config.batch_size = 1024
  config.eval_batch_size = 1024
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // config.batch_size  # 1251
  config.total_steps = epochs * steps_per_epoch
  config.warmup_steps = 10 * steps_per_epoch
  config.head_reinit_every = 10 * steps_per_epoch
  config.learning_rate = base_lr_per_256 * config.batch_size / 256
  config.min_learning_rate = 1e-6
  config.weight_decay = 0.04
  config.weight_decay_end = 0.4
  config.grad_clip_norm = 3.0
  config.teacher_momentum = teacher_momentum

  config.mesh = {"data": -1, "fsdp": 1}
  config.log_every = 100
  config.checkpoint_every = steps_per_epoch
  config.keep_checkpoints = 3
  config.knn_ks = (20,)
  return config


def epochs_from_arg(arg: str, config_name: str) -> int:
  arg = arg or "ep100"
  if arg not in _EPOCHS:
    raise ValueError(f"Unknown preset {arg!r} for configs/{config_name}.py: use one of "
                     f"{sorted(_EPOCHS)}.")
  return _EPOCHS[arg]


def get_config(arg: str = "ep100"):
  return imagenet_config("vit_small", epochs_from_arg(arg, "imagenet_vits16"),
                         base_lr_per_256=5e-4)
