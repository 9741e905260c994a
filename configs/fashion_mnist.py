"""BITS on Fashion-MNIST: the CPU demo.

  python -m bits_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/bits_fmnist
  python -m bits_jax.main --config=configs/fashion_mnist.py:test --workdir=/tmp/t

Presets (`:arg`):
  demo (default): a narrow ViT sized for a 2-core CPU (about 10 minutes).
  test: a very small model and a few steps, for tests.
Offline, the data come from the Debian package `dataset-fashion-mnist` (IDX files) when the
TFDS dataset is not prepared; with internet, TFDS downloads it.
"""
from bits_jax import config_defaults


def get_config(arg: str = "demo"):
  arg = arg or "demo"
  config = config_defaults.base_config()
  config.dataset = "fashion_mnist"
  config.num_channels = 1
  config.seed = 0

  config.global_crop_size = 28
  config.local_crop_size = 14
  config.num_global_crops = 2
  config.num_local_crops = 4
  config.global_crop_scale = (0.4, 1.0)
  config.local_crop_scale = (0.1, 0.4)

  config.model = "vit"
  config.patch_size = 7
  config.vit_width = 128
  config.vit_depth = 4
  config.vit_heads = 4

  config.bits = 256
  config.head_hidden_dim = 512
  config.head_bottleneck_dim = 128
  config.head_layers = 3

  config.batch_size = 128
  config.eval_batch_size = 512
  config.total_steps = 800
  config.warmup_steps = 80
  config.learning_rate = 1e-3
  config.head_reinit_every = 400
  config.log_every = 50
  config.checkpoint_every = 200

  if arg == "demo":
    pass
  elif arg == "test":
    config.vit_width = 32
    config.vit_depth = 1
    config.vit_heads = 2
    config.bits = 32
    config.head_hidden_dim = 64
    config.head_bottleneck_dim = 32
    config.num_local_crops = 2
    config.batch_size = 16
    config.eval_batch_size = 64
    config.total_steps = 6
    config.warmup_steps = 2
    config.head_reinit_every = 4
    config.log_every = 2
    config.checkpoint_every = 3
    config.test_split = "test[:256]"
    config.bank_split = "train[:512]"
  else:
    raise ValueError(f"Unknown preset {arg!r} for configs/fashion_mnist.py: use 'demo' or "
                     f"'test'.")
  return config
