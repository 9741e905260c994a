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
placeholder = ml_collections.config_dict.placeholder


def input_defaults() -> ConfigDict:
  """config.input: where the images come from and how they are cropped and augmented."""
  return ConfigDict(
      dict(
          # 'fashion_mnist' | a TFDS name | 'idx:/dir' | 'npz:/file.npz' | 'imagefolder:/dir'
          dataset="fashion_mnist",
          data_dir=placeholder(str),  # TFDS data_dir (may be gs://)
          idx_dir="/usr/share/datasets/fashion-mnist",  # offline Fashion-MNIST (Debian package)
          train_split="train",  # the training split (TFDS slicing allowed: 'train[:90%]')
          num_channels=3,  # channels fed to the model (images are converted to it)
          batch_size=256,  # global, over all devices and processes
          eval_batch_size=256,  # global batch of the evaluation pipeline
          shuffle_buffer=10_000,  # TFDS: records shuffled in memory
          skip_corrupt_images=False,  # imagefolder: skip undecodable files (counted, logged)
          threads=placeholder(int),  # tf.data private thread pool; None: TF's default
          prefetch_batches=2,  # host-side batches prepared ahead
          crops=ConfigDict(
              dict(
                  num_global=2,  # global crops (seen by student and teacher)
                  num_local=0,  # local crops (student only)
                  global_size=28,  # side of the global crops; the model's reference size
                  local_size=12,  # side of the local crops
                  global_scale=(0.32, 1.0),  # area range of the random-resized global crops
                  local_scale=(0.05, 0.32),  # area range of the local crops
                  # One (low, high) per global view in place of global_scale, e.g. ((0.4,
                  # 1.0), (1.0, 1.0)): a random crop and the whole image (not the paper's).
                  # () = global_scale for every global view.
                  global_view_scales=(),
                  # How crop windows are drawn: 'torchvision' (RandomResizedCrop, DINO's
                  # code: log-uniform aspect ratio) | 'inception' (TF's sampler).
                  window_sampler="torchvision",
              )
          ),
          augment=ConfigDict(
              dict(
                  flip=True,  # random horizontal flip
                  color_jitter_prob=0.8,  # probability of the colour jitter below
                  brightness=0.4,  # jitter strengths (DINO's values)
                  contrast=0.4,  # contrast jitter strength
                  saturation=0.2,  # saturation jitter strength
                  hue=0.1,  # hue jitter strength
                  grayscale_prob=0.2,  # probability of converting a view to grayscale
                  blur_probs=(1.0, 0.1, 0.5),  # first global view, other global views, local views
                  solarize_prob=0.2,  # second global view only
                  normalize_mean=placeholder(tuple),  # None: the dataset's known stats, else 0.5
                  normalize_std=placeholder(tuple),  # None: the dataset's known stats, else 0.5
                  resize_method="bicubic",  # tf.image.resize method of every crop
                  # Antialiased downscaling (as PIL) costs ~2x the resize time; TF SSL pipelines
                  # (SimCLR, big_vision) resize without it.
                  resize_antialias=False,
                  xla=True,  # XLA-compile hue/grayscale/normalize (2-3x faster on CPU)
              )
          ),
          eval_resize_size=placeholder(int),  # eval: resize the short side, then center-crop
          eval_crop_size=placeholder(int),  # None: the global crop size
      )
  )


def objective_defaults() -> ConfigDict:
  """config.objective: the method and its settings (each method reads its own section)."""
  return ConfigDict(
      dict(
          name="bits",  # 'bits' | 'dino' | 'simdino'
          # The projection head; its output size is the method's (bits, prototypes, dim).
          head=ConfigDict(
              dict(
                  hidden_dim=2048,  # width of the hidden layers
                  # Linear layer before the output layer; 0 = the paper's head (BITS: no
                  # bottleneck, d -> 2048 -> 2048 -> bits; DINO and SimDINO: 256).
                  bottleneck_dim=0,
                  num_layers=3,  # linear layers up to the bottleneck (the output layer if none)
                  # Head re-initialisation, for every method (paper: BITS every 10 epochs):
                  # steps or epochs, 0 = never.
                  reset_every_steps=0,
                  reset_every_epochs=0,  # (either one; the other stays 0)
                  reset_optimizer_state=True,  # reset the head's Adam moments/count too
              )
          ),
          # BITS (objectives/bits.py). Defaults: the paper's where it states one (hard
          # messages, BCE agreement, beta 0.1, 256 bits); the rest as the first landing trained.
          bits=ConfigDict(
              dict(
                  num_bits=256,  # bits per message (paper: 256)
                  bce_weight=1.0,  # weight of the cross-view agreement term
                  coding_rate_weight=0.1,  # beta (paper: 0.1)
                  agreement="bce",  # 'bce' (paper, Eq. 8) | 'cosine': logits vs +-1 (Tab. 3)
                  target_temperature=0.0,  # 0: hard messages (paper); tau > 0: sigmoid(a_t / tau)
                  bce_reduction="mean",  # over bits: 'sum' (as Eq. 8 is written) | 'mean'
                  rate_views="student",  # 'student' global views | 'student_teacher' (SimDINO)
                  rate_scope="global",  # Gram matrix of the 'global' batch | per 'device', averaged
                  # 'simdino': logdet(I + d/(n eps) Z^T Z) | 'paper': logdet(I + d/eps^2 Cov(Z))
                  rate_eps_convention="simdino",
                  rate_balance=True,  # times SimDINO's balancing factor (d + n) / (d n)
                  eps=0.05,  # coding-rate distortion
                  bce_logit_scale=0.0,  # not in the paper: >0 = BCE on logits of RMS this per bit
                  # Not in the paper (off = Eq. 7): threshold a_t - c, c an EMA of the teacher
                  # logits' batch mean per bit (DINO's centring), so no bit stays constant.
                  teacher_center=False,  # not in the paper: centre the teacher logits
                  teacher_center_momentum=0.9,  # EMA momentum of c (teacher_center only)
              )
          ),
          dino=ConfigDict(
              dict(
                  out_dim=65536,  # prototypes in the weight-normalised last layer
                  norm_last_layer=True,  # prototypes of unit norm (weight-norm scale fixed)
                  student_temp=0.1,  # student softmax temperature
                  teacher_temp=0.07,  # after the warm-up
                  warmup_teacher_temp=0.04,  # teacher temperature at step 0
                  warmup_teacher_temp_steps=300,  # linear warm-up of the teacher temperature
                  center_momentum=0.9,  # EMA of the teacher-score center
                  freeze_last_layer_steps=0,  # first steps with no update of the prototypes
              )
          ),
          simdino=ConfigDict(
              dict(
                  eps=0.5,  # R = 0.5 logdet(I + d / (n eps) Z^T Z)
                  coding_rate_weight=1.0,  # times the (d + n) / (d n) balancing factor
                  rate_views="student_teacher",  # rate of (z_s + z_t) / 2 (code) | 'student'
                  rate_scope="device",  # a Gram matrix per 'device' (code) | 'global' batch
              )
          ),
      )
  )


def optim_defaults() -> ConfigDict:
  """config.optim: AdamW with warm-up + cosine, weight-decay schedule, EMA teacher."""
  return ConfigDict(
      dict(
          learning_rate=5e-4,  # peak, after warm-up (absolute, not per 256)
          end_learning_rate=1e-6,  # at the end of the cosine decay
          warmup_steps=100,  # linear warm-up from 0
          weight_decay=0.04,  # cosine to weight_decay_end
          weight_decay_end=0.4,  # at the end of the run
          # Decay the ViT's pos_embed and cls_token too (DINO / SimDINO code: every param of
          # 2+ dims) | False: not them (timm's no_weight_decay)
          decay_embeddings=True,
          b1=0.9,  # Adam first-moment decay
          b2=0.999,  # Adam second-moment decay
          clip_norm=3.0,  # gradient-norm clipping threshold, 0 = none
          # 'per_tensor': each gradient tensor to norm <= clip_norm (DINO / SimDINO code, the
          # paper's) | 'global': the norm of all of them together (optax.clip_by_global_norm)
          clip_mode="per_tensor",
          teacher_momentum=0.996,  # cosine to teacher_momentum_end
          teacher_momentum_end=1.0,  # DINO's; < 1 keeps the teacher moving at the end
          grad_accum_steps=1,  # micro-batches per update (a scan inside the step)
      )
  )


def evals_defaults() -> ConfigDict:
  """config.evals: name -> {type, every (steps; 0 = not during training), at_end, kwargs}.

  `at_end` evaluators also run on the final weights of a training run (and, with
  `baseline_random_init`, on the same model at random init); `python -m bits_jax.evaluate`
  runs every entry.
  """
  return ConfigDict(
      dict(
          # Weighted k-NN top-1 (DINO protocol) of the CLS features, query split vs bank split.
          knn=ConfigDict(
              dict(
                  type="knn",
                  every=0,
                  at_end=True,
                  bank_split="train",
                  query_split="test",
                  ks=(10, 20, 100, 200),
                  temperature=0.07,
              )
          ),
          # Linear probe on frozen CLS features (learning-rate sweep on a held-out part).
          linear=ConfigDict(
              dict(
                  type="linear",
                  every=0,
                  at_end=False,
                  train_split="train",
                  test_split="test",
                  epochs=0,  # 0: the protocol's default (frozen 50, augmented 100)
                  protocol="frozen",  # 'frozen' features | 'augmented' (crop + flip each epoch)
                  last4=False,
              )
          ),
          # Retrieval mAP with the continuous features and with the binary codes (Hamming).
          retrieval=ConfigDict(
              dict(
                  type="retrieval",
                  every=0,
                  at_end=False,
                  database_split="train",
                  query_split="test",
                  query_split_file="",  # ids (one per line) selecting the queries; '' = all
                  database_split_file="",  # ids selecting the database rows; '' = all
                  query_classes_file="",  # class names (e.g. ImageNet100 wnids); '' = all
                  database_classes_file="",  # class names selecting database rows; '' = all
              )
          ),
          # Statistics of the teacher's binary messages (balance, entropy, correlation, ...).
          codes=ConfigDict(dict(type="codes", every=0, at_end=False, split="test")),
          # Eigen-spectrum of the backbone-feature covariance: d_eff, r_eff (paper Tab. 2).
          geometry=ConfigDict(dict(type="geometry", every=0, at_end=False, split="test")),
          # Patch-token k-NN segmentation of synthetic squares.
          dense=ConfigDict(dict(type="dense", every=0, at_end=False, num_images=64)),
          # DAVIS-2017 label propagation, DINO's protocol (paper Tab. 7); set a data source.
          davis=ConfigDict(
              dict(
                  type="davis",
                  every=0,
                  at_end=False,
                  data_dir=placeholder(str),  # DAVIS-2017 root (JPEGImages/, Annotations/, ...)
                  tfds_name=placeholder(str),  # or a prepared TFDS builder: 'davis/480p'
                  tfds_data_dir=placeholder(str),  # its TFDS data_dir (None: TFDS default)
                  max_sequences=placeholder(int),  # only the first sequences (None: all)
              )
          ),
          # MaskCut class-agnostic detection/segmentation AP on COCO val2017 (paper Tab. 6).
          maskcut=ConfigDict(
              dict(
                  type="maskcut",
                  every=0,
                  at_end=False,
                  images_dir=placeholder(str),  # COCO val2017/ images
                  annotations=placeholder(str),  # instances_val2017.json
                  tfds_name=placeholder(str),  # or 'coco/2017' (boxes) / 'coco/2017_panoptic'
                  tfds_data_dir=placeholder(str),  # its TFDS data_dir (None: TFDS default)
                  max_images=placeholder(int),  # only the first images (None: all)
              )
          ),
      )
  )


def base_config() -> ConfigDict:
  """All keys with their defaults (BITS, SimDINO-style recipe)."""
  config = ConfigDict()
  config.seed = 0  # seeds the init, the data order and the augmentations
  config.total_steps = 1000  # updates in the run (schedules are over these)
  config.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  config.log_every = 50  # steps between metric writes and progress lines
  config.checkpoint_every = 500  # steps between Orbax checkpoints
  config.keep_checkpoints = 3  # newest checkpoints kept
  # Continued SSL from other weights (a run workdir, checkpoint or converted params dir):
  # the backbone is loaded (channels / position grid adapted), the head per init_from_head.
  config.init_from = ""
  config.init_from_head = "reset"  # 'reset': a fresh head (BITS-reset) | 'keep' (BITS-fixed)
  # Fault tolerance (bits_jax/run_guard.py, checkpoint.py, config_validation.py).
  config.on_nonfinite = "skip"  # non-finite loss/grads: 'skip' the update (counted) | 'stop'
  config.max_consecutive_nonfinite = 10  # stop after this many skipped updates in a row
  config.allow_config_change = ""  # resume: keys allowed to differ ('a.b,c'; '*' = any)
  config.baseline_random_init = True  # at-end evaluators also on the random-init model
  config.baseline_pixels = True  # at-end k-NN and retrieval also on raw pixels
  # Gradient norm of each loss term on the logged steps (grad_norm/<term>, an extra backward
  # inside a lax.cond). Off: on XLA:CPU the taken branch ran 18x slower than a plain step
  # (demo preset, 2-core CPU), +50% per step on average at log_every=50.
  config.log_term_grad_norms = False
  # False passes the XLA:CPU option xla_cpu_experimental_ynn_fusion_type="" to the train-step
  # compilation (CPU meshes only), measured +3-8% on the 2-core AVX-512 CPU.
  config.xla_cpu_ynn_fusion = False
  # A jax profiler trace of `profile_steps` steps from `profile_first_step` (process 0, written
  # to WORKDIR/plugins/profile for TensorBoard's profile tab); 0 = no trace.
  config.profile_steps = 0
  config.profile_first_step = 10  # after the compilation

  config.input = input_defaults()
  # The backbone (bits_jax/models: 'vit_tiny' / 'vit_small' / 'vit_base' / 'vit_large', 'vit'
  # with width, depth, num_heads; 'resnet18' / 'resnet50' with width, small_stem) and its
  # options (any field of the module: patch_size, remat, gelu_approximate, attention, ...).
  config.model = ConfigDict(dict(name="vit_small", patch_size=16))
  config.objective = objective_defaults()
  config.optim = optim_defaults()
  config.evals = evals_defaults()

  config.mesh = ConfigDict(dict(data=-1, fsdp=1))  # axis sizes, -1 = remaining devices
  config.partition_rules = ((".*", "fsdp"),)  # (path regex, 'replicated' | 'fsdp' | spec)
  config.fsdp_min_size = 2**16  # arrays smaller than this stay replicated under 'fsdp'
  return config


# Sections whose keys depend on a choice (the backbone, the evaluators): their defaults are
# examples, not the options a stored run left out.
CHOICE_SECTIONS = ("model", "evals")


# Options added with a default that is not what the code did before (the paper's code's
# behaviour): a stored config without the key was trained with this value.
BEHAVIOUR_BEFORE_OPTION = {
    ("optim", "clip_mode"): "global",
    ("optim", "decay_embeddings"): False,
    ("objective", "simdino", "rate_views"): "student",
    ("objective", "simdino", "rate_scope"): "global",
}


def complete(config: ConfigDict, defaults: ConfigDict | None = None) -> ConfigDict:
  """`config` (changed in place) with the keys of `base_config()` it lacks.

  A run's stored config.json predates the options added to the code since: each missing key
  gets the value that keeps the behaviour the run was trained with, its default or, where the
  default changed the behaviour, `BEHAVIOUR_BEFORE_OPTION`. What the run stored wins, and the
  `CHOICE_SECTIONS` are not completed (a ResNet has no `patch_size`).
  """
  absent = [path for path in BEHAVIOUR_BEFORE_OPTION if not _has(config, path)]
  _fill_missing(config, base_config() if defaults is None else defaults, CHOICE_SECTIONS)
  for path in absent:
    parent = _parent(config, path)
    if parent is not None and path[-1] in parent:  # filled just now
      with parent.ignore_type():
        parent[path[-1]] = BEHAVIOUR_BEFORE_OPTION[path]
  return config


def _parent(config: ConfigDict, path: tuple[str, ...]) -> ConfigDict | None:
  """The section holding `path[-1]`, or None where a section on the way is missing."""
  node = config
  for key in path[:-1]:
    node = node.get(key) if isinstance(node, ConfigDict) else None
  return node if isinstance(node, ConfigDict) else None


def _has(config: ConfigDict, path: tuple[str, ...]) -> bool:
  parent = _parent(config, path)
  return parent is not None and path[-1] in parent


def _fill_missing(config: ConfigDict, defaults: ConfigDict, skip: tuple[str, ...] = ()) -> None:
  """Adds the keys of `defaults` that `config` lacks, recursing except into `skip`."""
  for key, value in defaults.items():
    if key not in config:
      with config.ignore_type():
        config[key] = value
    elif key not in skip and isinstance(value, ConfigDict) and isinstance(config[key], ConfigDict):
      _fill_missing(config[key], value)
