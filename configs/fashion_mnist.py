"""BITS on Fashion-MNIST: the CPU demo.

  python -m bits_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/bits_fmnist
  python -m bits_jax.main --config=configs/fashion_mnist.py:test,dino --workdir=/tmp/t

Presets (`:arg`, comma-separated, see `configs/common.py`):
  size    demo (default): a narrow ViT sized for a 2-core CPU | test: a tiny ViT, 6 steps.
  method  bits (BITS-reset, default) | bits_fixed | bits_cosine | dino | simdino, with the same
    backbone, data, schedule and evaluation. Only the BITS-reset presets re-initialise the head.
  backbone  vit (default) | resnet18: ResNet-18 width 32, standard stem, 850 steps (sized
    by a step 1.4x the ViT's; 1.75x on an AVX2 host). See the recipe below.

Recipe (issue 12): sized for a 2-core CPU, not the paper's ImageNet one. End to end, 1200
steps of batch 64 (2-core AMD EPYC without AVX-512, 2026-12-07 and -08), seeds 0 to 4: k-NN
top-1 (k=20, 60k bank, 10k queries) 84.11 / 84.78 / 84.60 / 84.66 / 84.49% (84.53 +- 0.26%)
against 73.86-75.31% at random init and 84.59% for the raw pixels: seeds 0 and 4 are 0.48
and 0.10 points under the pixels. Retrieval mAP@ALL 59.11 +- 0.42% (raw pixels 47.74%), the
256-bit messages 61.53 +- 0.81%. Every choice below was measured end to end on two or three
seeds or screened on a 480-step proxy; the figures, and the screens that did not help, are in
`benchmarks/README_demo_recipe.md`.
  - NOT the paper's: teacher momentum a constant 0.97 (the paper, SimDINO's default: 0.996 ->
    1). At 1200 steps a slow teacher lags the student: from 0.99, +0.56 k-NN and +3.4 mAP@ALL
    on the three seeds' mean; a schedule ending at 1 froze the teacher while the student
    still improved.
  - NOT the paper's: the second global view is the whole image (`input.crops.
    global_view_scales`; the paper draws both at (0.4, 1)): the items are centred and k-NN
    compares whole images, which one view now always shows (+0.65 k-NN on average).
  - NOT the paper's: fixed 2-D sine-cosine position embeddings (`model.posemb='sincos2d'`,
    MoCo v3) instead of learned ones: the 16 tokens get their layout from the first step
    (+0.6 / +1.7 k-NN, +4 mAP@ALL on seeds 0 / 1).
  - NOT the paper's: no horizontal flip (DINO's augmentations flip): the items come in one
    orientation, which k-NN can use (+1.0 / +0.2 k-NN).
  - NOT the paper's: `objective.bits.bce_logit_scale=2`, the BCE on the student logits
    rescaled to RMS 2 per bit: with raw logits the normalised rate's gradient is ~50x the
    BCE's at the head's small init and the student's bit accuracy stays at 0.50.
  - a narrow ViT (width 128, depth 4, patch 7: 16 tokens; `:resnet18`, with 1.2x the ViT's
    training time, ends 1.2 / 2.0 points lower on k-NN and 5.0 / 5.9 on mAP@ALL, seeds 0 /
    1) and head (hidden 512, the paper's 256 bits); 1200 steps of batch 64 at lr 1.4e-3
    (more, smaller steps beat 600 of batch 128 at equal wall time), head reset every 400
    steps; two global crops, no local ones; no blur or solarisation (too strong on 28 px
    gray images).
  - NOT the paper code's: gradient clipping on the norm of all gradients together
    (`optim.clip_mode='global'`) and no weight decay on the CLS token, which every figure was
    measured with (the paper's code clips each tensor and decays it: the defaults).
  - NOT the paper code's: crop windows by TF's inception sampler (`input.crops.window_sampler=
    'inception'`), not torchvision's RandomResizedCrop as in DINO's code: ahead on the proxy
    (two seeds).
Offline, the data come from the Debian package `dataset-fashion-mnist` (IDX files) when the
TFDS dataset is not prepared; with internet, TFDS downloads it.
"""

from bits_jax import config_defaults
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(
      arg, size=("demo", "test"), method=common.METHODS, backbone=("vit", "resnet18")
  )
  config = config_defaults.base_config()
  config.seed = 0
  config.total_steps = 1200
  config.log_every = 50
  config.checkpoint_every = 200

  data = config.input
  data.dataset = "fashion_mnist"
  data.num_channels = 1
  data.batch_size = 64
  data.eval_batch_size = 512
  data.crops.update(
      dict(
          global_size=28,
          local_size=14,
          num_global=2,
          num_local=0,
          global_scale=(0.4, 1.0),
          local_scale=(0.1, 0.4),
          window_sampler="inception",  # not DINO's torchvision sampler: see the docstring
          # Not the paper's: the second global view is the whole image (see the docstring).
          global_view_scales=((0.4, 1.0), (1.0, 1.0)),
      )
  )
  data.augment.update(dict(flip=False, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0))

  # Fixed sine-cosine position embeddings, not the paper's learned ones: see the docstring.
  config.model = dict(name="vit", patch_size=7, width=128, depth=4, num_heads=4, posemb="sincos2d")
  config.objective.head.update(dict(hidden_dim=512, bottleneck_dim=0, num_layers=3))
  config.objective.head.reset_every_steps = 400
  config.objective.bits.num_bits = 256
  config.objective.bits.bce_logit_scale = 2.0  # not the paper's: see the docstring
  config.optim.learning_rate = 1.4e-3
  config.optim.warmup_steps = 60
  config.optim.clip_mode = "global"  # the norm of all gradients together, as measured
  config.optim.decay_embeddings = False  # no decay of the CLS token, as measured
  # Not the paper's schedule (SimDINO's 0.996 -> 1): a constant 0.97, see the docstring.
  config.optim.teacher_momentum = 0.97
  config.optim.teacher_momentum_end = 0.97
  # The paper's headline metric at the end too (features and 256-bit codes, against raw
  # pixels); 2000 queries keep it to ~30 s on the CPU.
  config.evals.retrieval.update(
      dict(
          at_end=True,
          query_split="test[:2000]",
          ks=(100,),
          asymmetric=False,
          random_subsets=False,
      )
  )

  if arg.backbone == "resnet18":
    config.model = dict(name="resnet18", width=32, small_stem=False)
    config.total_steps = 850
    config.objective.head.reset_every_steps = 284
    config.optim.warmup_steps = 42

  if arg.size == "test":
    config.total_steps = 6
    config.log_every = 2
    config.checkpoint_every = 3
    if arg.backbone == "resnet18":
      config.model = dict(name="resnet18", width=4, small_stem=False)
    else:
      config.model = dict(
          name="vit", patch_size=7, width=32, depth=1, num_heads=2, posemb="sincos2d"
      )
    config.objective.head.update(dict(hidden_dim=64, bottleneck_dim=32))
    config.objective.bits.num_bits = 32
    config.objective.head.reset_every_steps = 4
    data.crops.num_local = 2
    data.batch_size = 16
    data.eval_batch_size = 64
    config.optim.warmup_steps = 2
    for entry in config.evals.values():
      for key in ("bank_split", "database_split", "train_split"):
        if key in entry:
          entry[key] = "train[:512]"
      for key in ("query_split", "test_split", "split"):
        if key in entry:
          entry[key] = "test[:256]"

  if arg.size == "demo":
    # The headline k only (the study's too): DINO's k = 10, 100, 200 on top made the demo's
    # four k-NN runs (trained, random init, raw and normalised pixels) ~45 s slower.
    config.evals.knn.ks = (20,)

  # DINO: teacher temperature warm-up over 30% of the run, prototypes frozen for the first
  # steps (DINO: 30 and 1 of 100 epochs); SimDINO uses the defaults of its paper's code.
  dino = config.objective.dino
  dino.out_dim = 4096 if arg.size == "demo" else 64
  dino.warmup_teacher_temp_steps = int(0.3 * config.total_steps)
  dino.freeze_last_layer_steps = config.optim.warmup_steps // 2
  config = common.set_method(config, arg.method)
  # DINO's head outputs prototype scores, not a message: no codes to retrieve with.
  config.evals.retrieval.codes = config.objective.name != "dino"
  return config
