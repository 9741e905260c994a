"""BITS on Fashion-MNIST: the CPU demo.

  python -m bits_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/bits_fmnist
  python -m bits_jax.main --config=configs/fashion_mnist.py:test --workdir=/tmp/t

Presets (`:arg`, comma-separated: a size and/or a method):
  demo (default): a narrow ViT sized for a 2-core CPU (about 10 minutes).
  test: a very small model and a few steps, for tests.
  bits (default) | dino | simdino: the method (`config.method`), with the same backbone,
    data, schedule and evaluation; e.g. `:dino` or `:test,simdino`. DINO and SimDINO keep
    the projection head (no periodic re-init, a BITS ingredient).
Offline, the data come from the Debian package `dataset-fashion-mnist` (IDX files) when the
TFDS dataset is not prepared; with internet, TFDS downloads it.
"""
from bits_jax import config_defaults


_SIZES = ("demo", "test")
_METHODS = ("bits", "dino", "simdino")


def _parse_arg(arg: str) -> tuple[str, str]:
  """'test,dino' -> ('test', 'dino'); missing parts default to ('demo', 'bits')."""
  size, method = "demo", "bits"
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if token in _SIZES:
      size = token
    elif token in _METHODS:
      method = token
    else:
      raise ValueError(f"Unknown preset {token!r} for configs/fashion_mnist.py: use a size "
                       f"({', '.join(_SIZES)}) and/or a method ({', '.join(_METHODS)}), "
                       f"comma-separated, e.g. 'test,dino'.")
  return size, method


def get_config(arg: str = "demo"):
  arg, method = _parse_arg(arg)
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

  config.method = method
  # DINO: teacher temperature warm-up over 30% of the run, prototypes frozen for the first
  # steps (DINO: 30 and 1 of 100 epochs); SimDINO uses the defaults of its paper's code.
  config.dino_out_dim = 4096 if arg == "demo" else 64
  config.dino_warmup_teacher_temp_steps = int(0.3 * config.total_steps)
  config.freeze_last_layer_steps = config.warmup_steps // 2 if method == "dino" else 0
  if method != "bits":
    config.head_reinit_every = 0
  return config
