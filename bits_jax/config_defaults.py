"""Every config key with its default: the one defaults module (`configs/*.py` start here).

The config is nested in the big_vision manner; every key can be overridden on the command
line, e.g. `--config.objective.bits.eps=0.05`, `--config.input.batch_size=512`:

  seed, total_steps, log_every, ...  the loop (top level)
  input       data source, splits, batch sizes, crops, augmentation    (bits_jax/data/)
  model       backbone: `name` + its keyword arguments                 (bits_jax/models/)
  objective   `name` + one section per method (bits, dino, simdino)    (bits_jax/objectives/)
              and the projection head shared by them (`head`)
  optim       optimizer, schedules, clipping, EMA teacher              (bits_jax/optim.py)
  evals       name -> {type, every, at_end, **kwargs}                  (bits_jax/evaluate/)
  mesh, partition_rules, fsdp_min_size   devices                       (bits_jax/sharding.py)

`model` takes the keyword arguments of the backbone named by `model.name` (the model
registry lists them); the other sections have fixed keys, checked by
`bits_jax.config_validation`.
"""
import ml_collections

ConfigDict = ml_collections.ConfigDict


def input_defaults() -> ConfigDict:
  """config.input: where the images come from and how they are cropped and augmented."""
  return ConfigDict(dict(
      # 'fashion_mnist' | a TFDS name | 'idx:/dir' | 'npz:/file.npz' | 'imagefolder:/dir'
      dataset="fashion_mnist",
      data_dir=None,  # TFDS data_dir (may be gs://)
      idx_dir="/usr/share/datasets/fashion-mnist",  # offline Fashion-MNIST (Debian package)
      train_split="train",
      num_channels=3,  # channels fed to the model (images are converted to it)
      batch_size=256,  # global, over all devices and processes
      eval_batch_size=256,
      shuffle_buffer=10_000,
      skip_corrupt_images=False,  # imagefolder: skip undecodable files (counted, logged)
      threads=None,  # tf.data private thread pool; None: TF's default
      prefetch_batches=2,  # host-side batches prepared ahead
      crops=ConfigDict(dict(
          num_global=2,
          num_local=0,
          global_size=28,
          local_size=12,
          global_scale=(0.32, 1.0),
          local_scale=(0.05, 0.32),
      )),
      augment=ConfigDict(dict(
          flip=True,
          color_jitter_prob=0.8,
          brightness=0.4,
          contrast=0.4,
          saturation=0.2,
          hue=0.1,
          grayscale_prob=0.2,
          blur_probs=(1.0, 0.1, 0.5),  # first global view, other global views, local views
          solarize_prob=0.2,  # second global view only
          normalize_mean=None,  # None: the dataset's known statistics, else 0.5
          normalize_std=None,
          resize_method="bicubic",
          # Antialiased downscaling (as PIL) costs ~2x the resize time; TF SSL pipelines
          # (SimCLR, big_vision) resize without it.
          resize_antialias=False,
          xla=True,  # XLA-compile hue/grayscale/normalize (2-3x faster on CPU)
      )),
      eval_resize_size=None,  # eval: resize the short side, then center-crop
      eval_crop_size=None,  # None: the global crop size
  ))


def objective_defaults() -> ConfigDict:
  """config.objective: the method and its settings (each method reads its own section)."""
  return ConfigDict(dict(
      name="bits",  # 'bits' | 'dino' | 'simdino'
      # The projection head; its output size is the method's (bits, prototypes, dim).
      head=ConfigDict(dict(hidden_dim=2048, bottleneck_dim=256, num_layers=3)),
      bits=ConfigDict(dict(
          num_bits=256,  # bits per message (paper: 256)
          bce_weight=1.0,
          coding_rate_weight=0.1,  # beta (paper: 0.1)
          eps=0.05,  # coding-rate distortion
          # Head re-initialisation (paper: every 10 epochs): steps or epochs, 0 = never.
          reset_every_steps=0,
          reset_every_epochs=0,
      )),
      dino=ConfigDict(dict(
          out_dim=65536,  # prototypes in the weight-normalised last layer
          norm_last_layer=True,
          student_temp=0.1,
          teacher_temp=0.07,  # after the warm-up
          warmup_teacher_temp=0.04,
          warmup_teacher_temp_steps=300,
          center_momentum=0.9,
          freeze_last_layer_steps=0,  # first steps with no update of the prototypes
      )),
      simdino=ConfigDict(dict(
          eps=0.5,  # R = 0.5 logdet(I + d / (n eps) Z^T Z)
          coding_rate_weight=1.0,  # times the (d + n) / (d n) balancing factor
      )),
  ))


def optim_defaults() -> ConfigDict:
  """config.optim: AdamW with warm-up + cosine, weight-decay schedule, EMA teacher."""
  return ConfigDict(dict(
      learning_rate=5e-4,  # peak, after warm-up (absolute, not per 256)
      end_learning_rate=1e-6,
      warmup_steps=100,
      weight_decay=0.04,  # cosine to weight_decay_end
      weight_decay_end=0.4,
      b1=0.9,
      b2=0.999,
      clip_norm=3.0,  # global gradient-norm clipping, 0 = none
      teacher_momentum=0.996,  # cosine to 1.0
      grad_accum_steps=1,  # micro-batches per update (a scan inside the step)
  ))


def evals_defaults() -> ConfigDict:
  """config.evals: name -> {type, every (steps; 0 = not during training), at_end, kwargs}.

  `at_end` evaluators also run on the final weights of a training run (and, with
  `baseline_random_init`, on the same model at random init); `python -m bits_jax.evaluate`
  runs every entry.
  """
  return ConfigDict(dict(
      knn=ConfigDict(dict(type="knn", every=0, at_end=True, bank_split="train",
                          query_split="test", ks=(10, 20, 100, 200), temperature=0.07)),
      linear=ConfigDict(dict(type="linear", every=0, at_end=False, train_split="train",
                             test_split="test", epochs=50, last4=False)),
      retrieval=ConfigDict(dict(type="retrieval", every=0, at_end=False,
                                database_split="train", query_split="test",
                                max_queries=2000)),
      codes=ConfigDict(dict(type="codes", every=0, at_end=False, split="test")),
      dense=ConfigDict(dict(type="dense", every=0, at_end=False, num_images=64)),
  ))


def base_config() -> ConfigDict:
  """All keys with their defaults (BITS, SimDINO-style recipe)."""
  config = ConfigDict()
  config.seed = 0
  config.total_steps = 1000
  config.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  # Continued SSL from other weights (a run workdir, checkpoint or converted params dir):
  # the backbone is loaded (channels / position grid adapted), the head starts fresh.
  config.init_from = ""
  # Fault tolerance (bits_jax/run_guard.py, checkpoint.py, config_validation.py).
  config.on_nonfinite = "skip"  # non-finite loss/grads: 'skip' the update (counted) | 'stop'
  config.max_consecutive_nonfinite = 10
  config.allow_config_change = ""  # resume: keys allowed to differ ('a.b,c'; '*' = any)
  config.baseline_random_init = True  # at-end evaluators also on the random-init model

  config.input = input_defaults()
  config.model = ConfigDict(dict(name="vit_small", patch_size=16))
  config.objective = objective_defaults()
  config.optim = optim_defaults()
  config.evals = evals_defaults()

  config.mesh = ConfigDict(dict(data=-1, fsdp=1))  # axis sizes, -1 = remaining devices
  config.partition_rules = ((".*", "fsdp"),)  # (path regex, 'replicated' | 'fsdp' | spec)
  config.fsdp_min_size = 2**16  # arrays smaller than this stay replicated under 'fsdp'
  return config
