"""Linear and MLP probes on a frozen backbone with a learning-rate sweep.

Two protocols (`protocol` of the 'linear' evaluator):
  'frozen' (default, fast): the probes train on cached features of the evaluation views
    (resize + center crop) of the train split, `epochs` 50.
  'augmented' (the SimDINO / DINO linear-evaluation protocol): every epoch the train split
    passes through the frozen backbone again with a random resized crop (scale 0.08-1,
    aspect 3/4-4/3) and a horizontal flip of each evaluation view, `epochs` 100; one
    optimiser step per eval batch. The crops are cut from the evaluation view rather than
    the full image. The learning rate is chosen on held-out train rows (their center-crop
    features) without retraining, and the chosen head is scored on the test views.

The MLP probe is Linear(d, hidden) -> GELU -> Linear(hidden, classes), first layer
truncated-normal with std sqrt(2 / d), last layer and biases zero; the linear probe is one
zero-initialised Linear(d, classes). All learning rates of the grid are trained at once
(vmapped over a leading model axis) on the same minibatches; the best one on a held-out part of the
training features is retrained on all of them and scored on the test set.
The optimizer is built with peak learning rate 1 and its updates are scaled
by each model's rate, which equals using that rate for SGD (momentum acts on
raw gradients) and for AdamW (decay is scaled by the rate too).
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bits_jax import utils
from bits_jax.evaluate import common

_EVAL_CHUNK = 8192


def _make_optimizer(
    name: str, total_steps: int, weight_decay: float, momentum: float
) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(1.0, max(total_steps, 1))
  if name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum)
    )
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer '{name}': use 'sgd' or 'adamw'.")


def _init_params(key, m: int, d: int, num_classes: int, hidden_dim: int):
  """Parameters of m identical heads (linear when hidden_dim == 0)."""
  if not hidden_dim:
    return {
        "w": jnp.zeros((m, d, num_classes), jnp.float32),
        "b": jnp.zeros((m, num_classes), jnp.float32),
    }
  w1 = jax.random.truncated_normal(key, -2.0, 2.0, (d, hidden_dim)) * jnp.sqrt(2.0 / d)
  return {
      "w1": jnp.broadcast_to(w1, (m, d, hidden_dim)),
      "b1": jnp.zeros((m, hidden_dim), jnp.float32),
      "w2": jnp.zeros((m, hidden_dim, num_classes), jnp.float32),
      "b2": jnp.zeros((m, num_classes), jnp.float32),
  }


def _head(p, x):
  """Logits of one head: x [n, d] -> [n, C]."""
  if "w" in p:
    return x @ p["w"] + p["b"]
  return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_classes",
        "epochs",
        "batch_size",
        "optimizer",
        "weight_decay",
        "momentum",
        "hidden_dim",
    ),
)
def _train(
    feats,
    labels,
    lrs,
    key,
    *,
    num_classes,
    epochs,
    batch_size,
    optimizer,
    weight_decay,
    momentum,
    hidden_dim=0,
):
  """Trains one head per learning rate.

  Args:
    feats: [n, d] (already standardized if wanted).
    labels: [n] int32.
    lrs: [m] peak learning rates.
    key: PRNG key for the initialisation and the per-epoch shuffles.
    hidden_dim: 0 for a linear head, else the MLP's hidden width.

  Returns:
    params {'w': [m, d, C], 'b': [m, C]} (linear) or {'w1', 'b1', 'w2', 'b2'} (MLP).
  """
  n, d = feats.shape
  m = lrs.shape[0]
  steps_per_epoch = n // batch_size
  tx = _make_optimizer(optimizer, epochs * steps_per_epoch, weight_decay, momentum)
  key, init_key = jax.random.split(key)
  params = _init_params(init_key, m, d, num_classes, hidden_dim)
  opt_state = jax.vmap(tx.init)(params)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_head(p, x), y).mean()

  def update_one(p, state, lr, x, y):
    grads = jax.grad(loss_fn)(p, x, y)
    updates, state = tx.update(grads, state, p)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(p, updates), state

  def step(carry, batch_idx):
    p, state = carry
    x = feats[batch_idx].astype(jnp.float32)
    y = labels[batch_idx]
    p, state = jax.vmap(update_one, in_axes=(0, 0, 0, None, None))(p, state, lrs, x, y)
    return (p, state), None

  def epoch(carry, epoch_key):
    perm = jax.random.permutation(epoch_key, n)
    batches = perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    return jax.lax.scan(step, carry, batches)[0], None

  (params, _), _ = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, epochs))
  return params


@jax.jit
def _correct_counts(params, feats, labels, valid):
  """[m, 2] counts of correct top-1 / top-5 predictions for each model."""
  logits = jax.vmap(_head, in_axes=(0, None))(params, feats.astype(jnp.float32))
  top1 = jnp.argmax(logits, -1) == labels[None]
  k = min(5, logits.shape[-1])
  _, top_idx = jax.lax.top_k(logits, k)
  top5 = jnp.any(top_idx == labels[None, :, None], axis=-1)
  return jnp.stack([jnp.sum(top1 & valid, -1), jnp.sum(top5 & valid, -1)], axis=1)


def _accuracy(params, feats, labels) -> np.ndarray:
  """[m, 2] top-1 / top-5 accuracy of each model, in fixed-size chunks."""
  n = feats.shape[0]
  chunk = min(_EVAL_CHUNK, n)
  counts = 0
  for start in range(0, n, chunk):
    x, y = feats[start : start + chunk], labels[start : start + chunk]
    valid = np.ones(x.shape[0], bool)
    if x.shape[0] < chunk:  # Pad to the static chunk shape.
      pad = chunk - x.shape[0]
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    counts = counts + np.asarray(_correct_counts(params, x, y, valid))
  return counts / n


def _host(x, name, ndim, mask=None):
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}.")
  return x if mask is None else x[np.asarray(mask, bool)]


def linear_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    num_classes: int,
    learning_rates: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    epochs: int = 50,
    batch_size: int = 1024,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    standardize: bool = True,
    retrain_on_full: bool = True,
    train_mask=None,
    test_mask=None,
    seed: int = 0,
    hidden_dim: int = 0,
) -> dict[str, float]:
  """Trains a linear (or, with hidden_dim > 0, MLP) classifier on frozen features and
  scores it on test.

  Args:
    train_feats: [n, d] features (e.g. CLS, or concatenated last-4 CLS).
    train_labels: [n] int class ids.
    test_feats: [q, d]; test_labels: [q].
    num_classes: number of classes.
    learning_rates: grid swept on the held-out split.
    epochs, batch_size: passes over the training split and minibatch size
      (clipped to the split size).
    optimizer: 'sgd' (with momentum) or 'adamw'; cosine schedule, no warmup.
    weight_decay: L2 (sgd) or decoupled (adamw) weight decay.
    val_fraction: fraction of train held out to pick the learning rate.
    standardize: scale each feature to zero mean and unit variance, with
      statistics of the rows the head is trained on.
    retrain_on_full: retrain the best rate on all train rows before testing.
    train_mask, test_mask: optional [n] / [q] bool; False rows are dropped.
    seed: seeds the held-out split, the initialisation and the shuffles.
    hidden_dim: 0 for a linear head; else the hidden width of a 2-layer MLP head, and the
      keys below start with 'mlp_' instead of 'linear_'.

  Returns:
    {'linear_top1', 'linear_top5' (if num_classes >= 5), 'linear_best_lr',
     'linear_val_top1', 'linear_val_top1_lr{lr}' for each rate}.
  """
  name = "mlp" if hidden_dim else "linear"
  # One host copy each, for the masked rows below and the finiteness check of all rows.
  train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
  x_train = _host(train_feats, "train_feats", 2, train_mask)
  y_train = _host(train_labels, "train_labels", 1, train_mask).astype(np.int32)
  x_test = _host(test_feats, "test_feats", 2, test_mask)
  y_test = _host(test_labels, "test_labels", 1, test_mask).astype(np.int32)
  if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
    raise ValueError("features and labels must have the same number of rows.")
  if x_train.shape[1] != x_test.shape[1]:
    raise ValueError(f"train dim {x_train.shape[1]} != test dim {x_test.shape[1]}.")
  # On the unmasked rows, so that the row named in the error is the caller's.
  common.check_finite(train_feats, "train_feats", train_mask)
  common.check_finite(test_feats, "test_feats", test_mask)
  for split, y in (("train", y_train), ("test", y_test)):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{split} labels must lie in [0, {num_classes}): check num_classes.")
  lrs = tuple(float(lr) for lr in learning_rates)
  if not lrs or min(lrs) <= 0:
    raise ValueError(f"learning_rates must be positive, got {lrs}.")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
  n = x_train.shape[0]
  n_val = int(round(n * val_fraction))
  if len(lrs) > 1 and n_val == 0:
    raise ValueError(
        "a learning-rate sweep needs held-out rows: set "
        "val_fraction > 0 or pass a single learning rate."
    )
  if n - n_val < 1 or x_test.shape[0] < 1:
    raise ValueError(f"too few rows: {n} train ({n_val} held out), {x_test.shape[0]} test.")

  key_split, key_sweep, key_full = jax.random.split(jax.random.key(seed), 3)
  perm = np.asarray(jax.random.permutation(key_split, n))
  fit_idx, val_idx = perm[n_val:], perm[:n_val]

  def fit(rows, rates, key):
    x = x_train[rows].astype(np.float32)
    mean = x.mean(0) if standardize else np.zeros(x.shape[1], np.float32)
    std = x.std(0) + 1e-6 if standardize else np.ones(x.shape[1], np.float32)
    params = _train(
        jnp.asarray((x - mean) / std),
        jnp.asarray(y_train[rows]),
        jnp.asarray(rates, jnp.float32),
        key,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=min(batch_size, len(rows)),
        optimizer=optimizer,
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        hidden_dim=int(hidden_dim),
    )
    return params, (lambda feats: (feats.astype(np.float32) - mean) / std)

  results = {}
  best = 0
  if n_val:
    params, transform = fit(fit_idx, lrs, key_sweep)
    val_acc = _accuracy(params, transform(x_train[val_idx]), y_train[val_idx])
    best = int(np.argmax(val_acc[:, 0]))  # First (smallest index) wins ties.
    for lr, acc in zip(lrs, val_acc[:, 0]):
      results[f"{name}_val_top1_lr{lr:g}"] = float(acc)
    results[f"{name}_val_top1"] = float(val_acc[best, 0])
  if retrain_on_full or not n_val:
    params, transform = fit(np.arange(n), (lrs[best],), key_full)
    test_acc = _accuracy(params, transform(x_test), y_test)[0]
  else:
    test_acc = _accuracy(params, transform(x_test), y_test)[best]
  results[f"{name}_best_lr"] = lrs[best]
  results[f"{name}_top1"] = float(test_acc[0])
  if num_classes >= 5:
    results[f"{name}_top5"] = float(test_acc[1])
  return results


def mlp_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    num_classes: int,
    hidden_dim: int = 1024,
    **kwargs,
) -> dict[str, float]:
  """linear_probe with a 2-layer MLP head (GELU, `hidden_dim` wide): {'mlp_top1', ...}."""
  if hidden_dim < 1:
    raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}.")
  return linear_probe(
      train_feats,
      train_labels,
      test_feats,
      test_labels,
      num_classes=num_classes,
      hidden_dim=hidden_dim,
      **kwargs,
  )


PROTOCOLS = {"frozen": 50, "augmented": 100}  # protocol -> default epochs


@common.register("linear")
def run(
    ctx,
    *,
    train_split: str = "train",
    test_split: str = "test",
    protocol: str = "frozen",
    epochs: Optional[int] = None,
    mlp: bool = False,
    last4: bool = False,
    learning_rates: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    mlp_learning_rates: Sequence[float] = (0.003, 0.01, 0.03, 0.1),
    hidden_dim: int = 1024,
    batch_size: int = 1024,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
  """Probes on the frozen backbone: train on `train_split`, score on `test_split`.

  Probes the CLS features ('linear_*'), with `mlp` also an MLP head ('mlp_*'), and with
  `last4` (ViT only) the same on the concatenated CLS of the last 4 blocks ('last4/...').
  `protocol`: 'frozen' (cached center-crop features) or 'augmented' (SimDINO: augmented
  views through the backbone every epoch; `batch_size` is then the eval batch size), see
  the module docstring. `epochs` None or 0: the protocol's default (50 / 100).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown probe protocol {protocol!r}: use one of {sorted(PROTOCOLS)}.")
  epochs = int(epochs or PROTOCOLS[protocol])
  train, test = ctx.features(train_split), ctx.features(test_split)
  if np.ndim(train["label"]) != 1:
    raise ValueError(
        "probes need one class id per image; this dataset has multi-hot labels: "
        "evaluate it with retrieval instead."
    )
  feature_sets = {"": "cls"}
  if last4:
    if "cls_last4" not in train:
      raise ValueError("last4=True needs 'cls_last4' features (ViT backbones only).")
    feature_sets["last4/"] = "cls_last4"
  heads = [("linear", 0, tuple(learning_rates))]
  if mlp:
    if hidden_dim < 1:
      raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}.")
    heads.append(("mlp", int(hidden_dim), tuple(mlp_learning_rates)))
  if protocol == "augmented":
    return _augmented_probes(
        ctx,
        train_split,
        train,
        test,
        feature_sets,
        heads,
        epochs=epochs,
        optimizer=optimizer,
        weight_decay=float(weight_decay),
        val_fraction=float(val_fraction),
        seed=int(seed),
    )
  common_args = {
      "num_classes": int(ctx.num_classes),
      "epochs": epochs,
      "batch_size": int(batch_size),
      "optimizer": optimizer,
      "weight_decay": float(weight_decay),
      "val_fraction": float(val_fraction),
      "train_mask": train["mask"],
      "test_mask": test["mask"],
      "seed": int(seed),
  }
  results = {}
  for prefix, key in feature_sets.items():
    args = (train[key], train["label"], test[key], test["label"])
    for _, hidden, rates in heads:
      probe = linear_probe(*args, learning_rates=rates, hidden_dim=hidden, **common_args)
      results.update({prefix + k: float(v) for k, v in probe.items()})
  return results


# ------------------------------------------------------------- the augmented protocol


@functools.partial(jax.jit, static_argnames=("scale", "ratio"))
def random_resized_crop_flip(key, images, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """A random resized crop (area fraction in `scale`, aspect w/h in `ratio`) and a random
  horizontal flip of each image: [n, S, S, C] float32 -> [n, S, S, C] (bilinear, antialiased).

  Out-of-range crop sides are clipped to the image (torchvision retries instead).
  """
  n, height, width, _ = images.shape
  k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(key, 5)
  area = jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1]) * height * width
  log_r = jax.random.uniform(k_ratio, (n,), minval=np.log(ratio[0]), maxval=np.log(ratio[1]))
  crop_w = jnp.clip(jnp.sqrt(area * jnp.exp(log_r)), 1.0, width)
  crop_h = jnp.clip(jnp.sqrt(area / jnp.exp(log_r)), 1.0, height)
  y0 = jax.random.uniform(k_y, (n,)) * (height - crop_h)
  x0 = jax.random.uniform(k_x, (n,)) * (width - crop_w)

  def one(image, h, w, y, x):
    s = jnp.stack([height / h, width / w])
    return jax.image.scale_and_translate(
        image, image.shape, (0, 1), s, -jnp.stack([y, x]) * s, method="linear"
    )

  out = jax.vmap(one)(images, crop_h, crop_w, y0, x0)
  flip = jax.random.bernoulli(k_flip, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)


def _make_step(tx: optax.GradientTransformation):
  """One update of m heads on a batch: (params, state, lrs [m], x [b, d], y [b], w [b])."""

  def loss_fn(p, x, y, w):
    ce = optax.softmax_cross_entropy_with_integer_labels(_head(p, x), y)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

  def update_one(p, state, lr, x, y, w):
    grads = jax.grad(loss_fn)(p, x, y, w)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, jax.tree.map(lambda u: lr * u, updates)), state

  return jax.jit(jax.vmap(update_one, in_axes=(0, 0, 0, None, None, None)))


def _augmented_probes(
    ctx,
    train_split,
    train,
    test,
    feature_sets,
    heads,
    *,
    epochs,
    optimizer,
    weight_decay,
    val_fraction,
    seed,
) -> dict[str, float]:
  """The 'augmented' protocol for every (feature set, head) in one pass per epoch."""
  from bits_jax import data  # pylint: disable=g-import-not-at-top

  num_classes = int(ctx.num_classes)
  valid = np.asarray(train["mask"], bool)
  rows = np.flatnonzero(valid)
  key = jax.random.key(seed)
  n_val = int(round(len(rows) * val_fraction))
  if n_val == 0 and any(len(rates) > 1 for _, _, rates in heads):
    raise ValueError(
        "a learning-rate sweep needs held-out rows: set val_fraction > 0 or pass a single "
        "learning rate."
    )
  val_rows = rows[np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), len(rows)))][:n_val]
  train_weight = valid.astype(np.float32)
  train_weight[val_rows] = 0.0
  if not train_weight.any():
    raise ValueError(f"no train rows left in {train_split!r} after holding out {n_val}.")
  batch_rows = int(ctx.config.input.eval_batch_size)
  steps = epochs * -(-len(valid) // batch_rows)
  tx = _make_optimizer(optimizer, steps, weight_decay, 0.9)
  step_fn = _make_step(tx)

  stats, probes = {}, []
  for prefix, feature in feature_sets.items():
    x = np.asarray(train[feature], np.float32)[train_weight > 0]
    stats[feature] = (x.mean(0), x.std(0) + 1e-6)
    for name, hidden, rates in heads:
      key, init_key = jax.random.split(key)
      params = _init_params(init_key, len(rates), x.shape[1], num_classes, hidden)
      probes.append([prefix, feature, name, rates, params, jax.vmap(tx.init)(params)])

  outputs = tuple(feature_sets.values())
  aug_key = jax.random.fold_in(jax.random.fold_in(key, 2), jax.process_index())
  for epoch in range(epochs):
    offset = 0
    for k, batch in enumerate(data.make_eval_iterator(ctx.config, train_split)):
      images = random_resized_crop_flip(
          jax.random.fold_in(jax.random.fold_in(aug_key, epoch), k), batch["image"]
      )
      feats = ctx.predict_batch(np.asarray(images), outputs)
      labels = ctx.gather(np.asarray(batch["label"], np.int32))
      weight = train_weight[offset : offset + len(labels)]
      offset += len(labels)
      for probe in probes:
        _, feature, _, rates, params, state = probe
        mean, std = stats[feature]
        x = (utils.to_host(feats[feature]) - mean) / std
        probe[4], probe[5] = step_fn(
            params, state, jnp.asarray(rates, jnp.float32), x, labels, weight
        )

  results = {}
  test_valid = np.asarray(test["mask"], bool)
  for prefix, feature, name, rates, params, _ in probes:
    mean, std = stats[feature]
    best = 0
    if n_val:
      x_val = (np.asarray(train[feature], np.float32)[val_rows] - mean) / std
      val_acc = _accuracy(params, x_val, np.asarray(train["label"])[val_rows].astype(np.int32))
      best = int(np.argmax(val_acc[:, 0]))
      for lr, acc in zip(rates, val_acc[:, 0]):
        results[f"{prefix}{name}_val_top1_lr{lr:g}"] = float(acc)
      results[f"{prefix}{name}_val_top1"] = float(val_acc[best, 0])
    x_test = (np.asarray(test[feature], np.float32)[test_valid] - mean) / std
    y_test = np.asarray(test["label"])[test_valid].astype(np.int32)
    test_acc = _accuracy(jax.tree.map(lambda p: p[best : best + 1], params), x_test, y_test)[0]
    results[f"{prefix}{name}_best_lr"] = float(rates[best])
    results[f"{prefix}{name}_top1"] = float(test_acc[0])
    if num_classes >= 5:
      results[f"{prefix}{name}_top5"] = float(test_acc[1])
  return results
