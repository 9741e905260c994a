"""Continued SSL on a new domain (paper Tab. 8 / 14): evaluate, 10 epochs of BITS, evaluate.

  # BITS-fixed: the pre-trained head is kept
  python -m bits_jax.main --config=configs/transfer.py:fixed,dataset=food101 \
      --config.init_from=gs://B/vitb16_fixed --workdir=gs://B/transfer/food101_fixed \
      --config.input.data_dir=gs://B/tensorflow_datasets
  # BITS-reset: the head is re-initialised once, at the start
  python -m bits_jax.main --config=configs/transfer.py:reset,dataset=caltech_birds2011 \
      --config.init_from=gs://B/vitb16_reset --workdir=gs://B/transfer/birds_reset
  # any image folder (<root>/<class>/*.jpg, or <root>/{train,test}/<class>/*.jpg)
  python -m bits_jax.main \
      --config=configs/transfer.py:reset,dataset=imagefolder:/data/plantnet300k \
      --config.init_from=/runs/vitb16_reset --workdir=/runs/transfer/plantnet_reset

`init_from` (a run workdir, a checkpoint or a converted params dir) is required: a run without
it stops with an error naming `--config.init_from`; it may also be given as a preset option
(`:fixed,dataset=food101,init_from=/runs/vitb16_fixed`, no commas in the path).

Presets (`:arg`, see `configs/common.py`):
  variant  reset (default): `init_from_head='reset'`, the head is drawn fresh once at the start
           | fixed: `init_from_head='keep'`, the checkpoint's head is kept (same head shapes
           needed). Neither resets the head during the 10 epochs (the paper: "BITS-reset's head
           re-initialised once at the start of the adaptation; BITS-fixed keeps its head").
  dataset  food101 (TFDS, train 75,750 / validation 25,250) | caltech_birds2011 (TFDS, train
           5,994 / test 5,794) | i_naturalist2021 (TFDS, train `mini` 500,000 / `val` 100,000)
           | imagefolder:/path (train / test splits as the image-folder source makes them).
  model    vit_base (default, the paper's ViT-B/16) | vit_small: the backbone of init_from.
  init_from  the weights, as an alternative to --config.init_from.

What the run writes: `results.json` holds the at-end evaluators (k-NN, linear probe, retrieval
mAP, each on the target's train split vs its test split) on the loaded weights before any
update (`init_from/<eval>/<metric>`, the frozen column of Tab. 8 / 14) and on the adapted
teacher (`trained/<eval>/<metric>`); see `bits_jax.train.train_and_evaluate`.

Recipe. [paper]: 10 epochs of continued SSL on the target domain, BITS (256 bits, beta 0.1),
ViT-B/16. The paper gives no other adaptation setting, so the rest is the pre-training recipe of
`configs/imagenet_vitb16.py` (batch 256, lr 5e-4 x batch / 256 (no lower fine-tuning lr: none
is stated), end lr 5e-5, clip 1.0, drop-path 0.1, 2 x 224 + 10 x 96 crops, weight decay
0.04 -> 0.4 and teacher momentum 0.996 -> 1 over the run), with [ours]: 1 warm-up epoch (the
pre-training's 10 of 100 epochs, in proportion; 10 would cover the whole run), the i_naturalist2021
`mini` split for training and as the evaluation train split (the paper uses iNat2019, 265k
images, not in TFDS; `mini` is the closest in size), evaluation of 256-px resized, 224 center
crops, inputs normalised with ImageNet's statistics as in the pre-training. Birds525 and
PlantNet300k (also in Tab. 8) are image folders. The paper's MLP probe and SimDINO's
augmented 100-epoch linear protocol are evaluator options (config.evals.linear).
"""

import os

from bits_jax import weights
from bits_jax.data import augment
from configs import common
from configs import imagenet_vits16

EPOCHS = 10  # [paper]
# TFDS name -> (training split, its size, test split).
TFDS_TARGETS = {
    "food101": ("train", 75_750, "validation"),
    "caltech_birds2011": ("train", 5_994, "test"),
    "i_naturalist2021": ("mini", 500_000, "val"),
}
IMAGEFOLDER = "imagefolder:"
MISSING_INIT_FROM = (
    weights.REQUIRED
    + " configs/transfer.py continues SSL from pre-trained weights: pass "
    "--config.init_from=<run workdir, checkpoint or converted params dir> (or the preset "
    "option init_from=...)."
)


def _target(dataset: str, config) -> tuple[str, int, str]:
  """(train split, its size, test split) of `dataset`."""
  if dataset in TFDS_TARGETS:
    return TFDS_TARGETS[dataset]
  if dataset.startswith(IMAGEFOLDER):
    from bits_jax import data  # pylint: disable=g-import-not-at-top

    info = data.get_dataset_info(config)
    if not info.num_examples.get("train"):
      raise ValueError(f"{dataset} has no 'train' images: {info.num_examples}.")
    return "train", int(info.num_examples["train"]), "test"
  raise ValueError(
      f"configs/transfer.py dataset={dataset!r}: use one of {sorted(TFDS_TARGETS)} or "
      "imagefolder:/path."
  )


def get_config(arg=None):
  arg = common.parse_arg(
      arg,
      variant=("reset", "fixed"),
      dataset="food101",
      model=("vit_base", "vit_small"),
      init_from="",
  )
  # The ImageNet recipe with the head never reset during the run.
  config = imagenet_vits16.imagenet_config(arg.model, EPOCHS, "fixed")
  config.init_from = os.path.expanduser(arg.init_from) if arg.init_from else MISSING_INIT_FROM
  config.init_from_head = {"fixed": "keep", "reset": "reset"}[arg.variant]
  config.baseline_random_init = False

  data = config.input
  data.dataset = arg.dataset
  data.data_dir = None  # where the TFDS dataset is (or will be) prepared
  train_split, num_train, test_split = _target(arg.dataset, config)
  data.train_split = train_split
  # [ours] The pre-trained weights saw ImageNet-normalised inputs: keep those statistics on the
  # target (left unset, an unknown dataset's would be 0.5 / 0.5, ~2x the input scale).
  data.augment.normalize_mean, data.augment.normalize_std = augment.known_normalization(
      "imagenet2012"
  )
  for entry in config.evals.values():
    entry.every = 0
    entry.at_end = entry.type in ("knn", "linear", "retrieval")
    for key in ("bank_split", "train_split", "database_split"):
      if key in entry:
        entry[key] = train_split
    for key in ("query_split", "test_split", "split"):
      if key in entry:
        entry[key] = test_split

  per_epoch = imagenet_vits16.steps_per_epoch(num_train, data.batch_size)
  config.total_steps = EPOCHS * per_epoch
  config.optim.warmup_steps = per_epoch  # [ours] 1 of 10 epochs (see the module doc)
  config.checkpoint_every = per_epoch
  config.log_every = min(100, per_epoch)
  return config
