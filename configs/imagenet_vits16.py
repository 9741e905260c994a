"""ViT-S/16 from scratch on ImageNet-1k (TFDS `imagenet2012`): the paper's recipe, smaller model.

  python -m bits_jax.main --config=configs/imagenet_vits16.py:reset --workdir=gs://B/vits16 \
      --config.input.data_dir=gs://B/tensorflow_datasets

Presets (`:arg`, comma-separated, see `configs/common.py`):
  variant  reset (default): BITS-reset, heads re-initialised every 10 epochs | fixed: BITS-fixed,
           never reset | dino | simdino: the baselines with their own code's settings.
  length   ep100 (default, the paper's 100 epochs) | ep300.

The paper trains ViT-B/16 only (`configs/imagenet_vitb16.py`); this file holds the recipe both
presets share, `imagenet_config`, and applies it to ViT-S/16 unchanged (nothing here is tuned
for ViT-S). Sources, per value: [paper] = stated by the paper (PAPER.md: Sec. 4.5, 5, Tab. 12,
13); [simdino] = the SimDINO code base the paper names, whose defaults it says it keeps
(PAPER.md "SimDINO defaults for the rest"); [dino] = the DINO paper / code; [ours] = stated by
none of them.

BITS (reset, fixed):
  data     ImageNet-1k train, global batch 256 [paper], 2 global crops of 224 px, scale
           (0.4, 1) [simdino] + 10 local crops of 96 px, scale (0.05, 0.4) [simdino: 10 is
           SimDINO's README command for ViT-B/16, its code default is 8; the paper does not
           give the number]; DINO augmentations [simdino] (`config_defaults.input_defaults`).
  model    drop-path 0.1 on the student [simdino], none on the teacher (the train step gives
           the 'drop_path' rng to the student only).
  BITS     256 bits [paper], beta 0.1 [paper], the paper's head (d -> 2048 -> 2048 -> 256,
           `objective.head` defaults) [paper]; head resets every 10 epochs (`reset`) or never
           (`fixed`) [paper]; what happens to the head's optimizer state at a reset is not
           stated [ours: reset with the head, `objective.head.reset_optimizer_state`]. The
           coding rate's eps, views, scope and reduction are not stated by the paper: the
           `objective.bits` defaults (see config_defaults.py for their documented choice).
  optim    AdamW, lr 5e-4 x batch / 256 [simdino], 10 linear warm-up epochs [simdino], cosine
           to 5e-5 [paper, Tab. 13], weight decay 0.04 -> 0.4 cosine on every param of 2+ dims,
           position embedding and CLS token included [simdino code], gradient clip
           1.0 [paper, Tab. 12] per tensor (`optim.clip_mode` default) [simdino / dino code:
           `clip_gradients` bounds each parameter's gradient norm], teacher momentum 0.996 ->
           1 cosine [simdino], Adam betas (0.9, 0.999) [simdino: PyTorch's AdamW defaults].
  run      100 epochs [paper] = 100 x floor(1,281,167 / 256) = 500,400 steps; bfloat16
           compute with float32 params [ours; SimDINO trains in fp16 mixed precision].
DINO (`dino`): the shared data/model/schedule above, with DINO's loss and optimization settings:
  out_dim 65536, weight-normalised last layer (DINO recommends it for ViT-B), student temp
  0.1, teacher temp 0.04 -> 0.07 linear over the first 30 epochs, center momentum 0.9, last
  layer frozen for the first epoch [dino paper / main_dino.py]; gradient clip 3.0 and end lr
  1e-6 [dino + simdino code defaults]. Not stated for this setting: DINO's released ViT-B/16
  run used batch 1024, clip 0.3, 3 frozen epochs, teacher temp warm-up of 50 epochs and
  crop scales (0.25, 1) / (0.05, 0.25) over 400 epochs; its code suggests teacher momentum
  0.9995 at batch 256 [dino]. We keep the paper's batch 256 and 0.996 so the four methods
  differ only in the objective (the paper's Tab. 1 setting, whose DINO run it does not detail).
SimDINO (`simdino`): SimDINO's ViT-B/16 command: eps 0.05 (the README; the code's default is
  0.5), coding-rate coefficient 1, 10 local crops; gradient clip 3.0 and end lr 1e-6 (code
  defaults); its 256-d bottleneck head (`objective.head` defaults for SimDINO). SimDINO's own
  runs used 8 GPUs x 64 = 512 images per step [simdino README]; we keep batch 256 as above.
  The expansion term as SimDINO's code computes it (`objective.simdino` defaults): per
  device, on the mean of the student's and the teacher's global views [simdino code].

`imagenet2012` must be prepared in `data_dir` (TFDS needs the manually downloaded archives).
Scale-out keys: `--config.mesh.fsdp=N` (FSDP over N devices),
`--config.optim.grad_accum_steps=K`, `--config.model.remat=True`; see the README's "TPU and
multi-GPU runs".
"""

from bits_jax import config_defaults
from configs import common

IMAGENET_TRAIN_EXAMPLES = 1_281_167
VARIANTS = ("reset", "fixed", "dino", "simdino")
BATCH_SIZE = 256  # [paper]
BASE_LR_PER_256 = 5e-4  # [simdino]
WARMUP_EPOCHS = 10  # [simdino]
RESET_EVERY_EPOCHS = 10  # [paper]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Updates per epoch (the last partial batch is dropped, as the SimDINO loader does)."""
  return max(num_examples // batch_size, 1)


def imagenet_config(model: str, epochs: int, variant: str = "reset"):
  """The paper's ImageNet-1k recipe for `model` over `epochs` epochs (see the module doc)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: use one of {VARIANTS}.")
  config = config_defaults.base_config()
  config.seed = 0
  config.dtype = "bfloat16"

  data = config.input
  data.dataset = "imagenet2012"
  data.data_dir = None  # where TFDS imagenet2012 is prepared, e.g. gs://...
  data.train_split = "train"
  data.num_channels = 3
  data.batch_size = BATCH_SIZE
  data.eval_batch_size = 1024
  data.eval_resize_size = 256
  data.eval_crop_size = 224
  data.crops.update(
      dict(
          global_size=224,
          local_size=96,
          num_global=2,
          num_local=10,
          global_scale=(0.4, 1.0),
          local_scale=(0.05, 0.4),
      )
  )
  for entry in config.evals.values():
    for key in ("query_split", "test_split", "split"):
      if key in entry:
        entry[key] = "validation"
  config.evals.knn.ks = (20,)

  config.model = dict(name=model, patch_size=16, remat=False, drop_path_rate=0.1)

  per_epoch = steps_per_epoch(IMAGENET_TRAIN_EXAMPLES, data.batch_size)  # 5004 at 256
  config.total_steps = epochs * per_epoch
  optim = config.optim
  optim.learning_rate = BASE_LR_PER_256 * data.batch_size / 256
  optim.warmup_steps = WARMUP_EPOCHS * per_epoch
  optim.end_learning_rate = 5e-5  # [paper, Tab. 13]
  optim.weight_decay = 0.04
  optim.weight_decay_end = 0.4
  optim.clip_norm = 1.0  # [paper, Tab. 12]
  optim.teacher_momentum = 0.996

  common.set_method(config, "bits" if variant in ("reset", "fixed") else variant)
  config.objective.bits.num_bits = 256
  config.objective.bits.coding_rate_weight = 0.1
  if variant == "reset":
    config.objective.head.reset_every_steps = RESET_EVERY_EPOCHS * per_epoch
  elif variant == "dino":
    dino = config.objective.dino
    dino.update(
        dict(
            out_dim=65536,
            norm_last_layer=True,
            student_temp=0.1,
            warmup_teacher_temp=0.04,
            teacher_temp=0.07,
            warmup_teacher_temp_steps=30 * per_epoch,
            center_momentum=0.9,
            freeze_last_layer_steps=1 * per_epoch,
        )
    )
    optim.clip_norm, optim.end_learning_rate = 3.0, 1e-6
  elif variant == "simdino":
    config.objective.simdino.update(dict(eps=0.05, coding_rate_weight=1.0))
    optim.clip_norm, optim.end_learning_rate = 3.0, 1e-6

  config.log_every = 100
  config.checkpoint_every = per_epoch
  config.keep_checkpoints = 3
  return config


def parse(arg):
  """The presets of both ImageNet files: variant and length."""
  return common.parse_arg(arg, variant=VARIANTS, length=("ep100", "ep300"))


def get_config(arg=None):
  arg = parse(arg)
  return imagenet_config("vit_small", int(arg.length[2:]), arg.variant)
