"""Defaults shared by every experiment config; `configs/*.py` start from `base_config()`.

Keys are flat and named for what they mean. Data keys (crops, augmentation, splits) come from
`bits_jax.data.pipeline.default_data_config()`.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults (BITS, SimDINO-style recipe)."""
  from bits_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = pipeline.default_data_config()
  config.num_channels = 3             # image channels fed to the model

  # Method.
  config.method = "bits"              # 'bits' | 'dino' | 'simdino' (bits_jax/objectives/)
  config.bits = 256                   # channel width: one logit per bit (paper: 256)
  config.bce_weight = 1.0
  config.coding_rate_weight = 0.1
  config.coding_rate_eps = 0.05
  config.head_reinit_every = 0        # steps between head re-inits; 0 = never
  config.head_hidden_dim = 2048
  config.head_bottleneck_dim = 256
  config.head_layers = 3

  # DINO (bits_jax/objectives/dino.py); the head also uses head_hidden_dim/bottleneck/layers.
  config.dino_out_dim = 65536         # prototypes in the weight-normalized last layer
  config.dino_norm_last_layer = True  # prototypes of unit norm (weight-norm scale fixed to 1)
  config.dino_student_temp = 0.1
  config.dino_teacher_temp = 0.07     # after the warm-up
  config.dino_warmup_teacher_temp = 0.04
  config.dino_warmup_teacher_temp_steps = 300  # linear warm-up of the teacher temperature
  config.dino_center_momentum = 0.9
  config.freeze_last_layer_steps = 0  # first steps with no updates to head/last_layer (DINO)

  # SimDINO (bits_jax/objectives/simdino.py); projection dim = head_bottleneck_dim.
  config.simdino_eps = 0.5            # coding-rate eps: R = 0.5 logdet(I + d/(n eps) Z^T Z)
  config.simdino_coding_rate_weight = 1.0  # times the (d + n) / (d n) balancing factor

  # Model.
  config.model = "vit_small"          # 'vit_tiny' | 'vit_small' | 'vit_base' | 'vit'
  config.vit_width = 192              # only for model='vit'
  config.vit_depth = 12
  config.vit_heads = 3
  config.patch_size = 16
  config.dtype = "float32"            # compute dtype: 'float32' | 'bfloat16'
  config.remat = False                # rematerialize each transformer block
  config.resnet_width = 64            # model='resnet18'|'resnet50': channels of the stem
  config.resnet_small_stem = False    # 3x3/1 stem, no max-pool (CIFAR-size images)

  # Optimization.
  config.total_steps = 1000
  config.learning_rate = 5e-4         # peak, after warmup (absolute, not per-256)
  config.min_learning_rate = 1e-6
  config.warmup_steps = 100
  config.weight_decay = 0.04
  config.weight_decay_end = 0.4
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.grad_clip_norm = 3.0         # 0 = no clipping
  config.teacher_momentum = 0.996     # cosine schedule to 1.0
  config.grad_accum_steps = 1         # micro-batches per update (scan inside the step)

  # Devices (bits_jax/sharding.py).
  config.mesh = {"data": -1, "fsdp": 1}   # axis sizes, -1 = the remaining devices
  config.partition_rules = ((".*", "fsdp"),)  # (path regex, 'replicated'|'fsdp'|spec)
  config.fsdp_min_size = 2 ** 16      # arrays smaller than this stay replicated under 'fsdp'

  # Loop, checkpoints, logging.
  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 3

  # Fault tolerance (bits_jax/preemption.py, checkpoint.py, config_validation.py).
  config.on_nonfinite = "skip"        # non-finite loss/grads: 'skip' the update (counted) | 'stop'
  config.max_consecutive_nonfinite = 10  # stop after this many skipped updates in a row
  config.allow_config_change = ""     # resume: keys allowed to differ from config.json ('a,b'; '*')

  # End-of-run evaluation.
  config.knn_eval = True
  config.knn_ks = (20,)
  config.knn_temperature = 0.07

  # Full evaluation (`python -m bits_jax.evaluate`).
  config.eval_knn_ks = (10, 20, 100, 200)
  config.eval_linear = True           # linear probe on frozen CLS features
  config.eval_linear_last4 = False    # also on concatenated last-4-block CLS (DINO protocol)
  config.eval_linear_epochs = 50
  config.eval_retrieval_queries = 2000  # test queries for retrieval (None: all)
  config.eval_dense = True            # patch k-NN segmentation probe (synthetic squares)
  config.eval_dense_images = 64

  # Continued SSL from other weights: a run workdir, checkpoint or converted params dir.
  # The backbone is loaded (channels / position grid adapted), the head starts fresh.
  config.init_from = ""
  return config
