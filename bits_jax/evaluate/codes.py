"""Statistics of the teacher's binary message, read as a discrete language.

Given logits [n, b] (the code is logits > 0) and class labels [n], measures
how each bit is used (balance, entropy, redundancy with other bits), how much
each bit says about the class (mutual information), which bits are
class-specific "words" and which are shared "grammar", and how distinct the
per-class prototype codes are.

Definitions (all entropies and informations in bits, log base 2):
  balance of a bit: fraction of images where it is 1.
  dead bit: balance exactly 0 or 1 (carries no information).
  activation[c, j]: fraction of class-c images with bit j on.
  class-specific bit j (owned by class c): activation[c, j] >= specific_on
    and bit j is on for <= specific_off of all images outside class c.
  shared bit: activation >= shared_on in at least half (rounded up) of the
    classes present.
  prototype code of a class: its majority vote, bit on iff activation > 0.5.
  effective rank of logits: exp of the Shannon entropy (nats) of the
    singular values normalized to sum to one (Roy & Vetterli, 2007),
    uncentered, as in RankMe.
Only classes with at least one (unmasked) image take part in per-class
statistics; 'classes' lists them in the order used by the per-class arrays.

The code as a language (Sec. 5.5 of the paper):
  group entropy: plug-in (maximum-likelihood) entropy in bits of the joint value of a group of
    k bits over the n codes: 8.0 for 8 independent fair bits, 1.0 for 8 copies of one fair bit.
    Groups are contiguous blocks (bits 0-7, 8-15, ...; leftover bits unused) or a seeded random
    partition of the bits into groups of k. The plug-in estimate is biased low by about
    (K - 1) / (2 n ln 2) bits for K symbols with nonzero probability (Miller-Madow): 0.09 bits
    for K = 256 and n = 2000, 0.02 for n = 10000; the '_mm' values add that correction with K
    the number of observed symbols. Use n >> 2^k.
  attribute bits: a bit names an attribute shared across classes when flipping it moves the
    images' descriptors (backbone features) the same way in every class. For bit j and each
    class c with at least `min_images` images with the bit on and off, u_cj is the unit vector
    of mean(descriptor | on, c) - mean(descriptor | off, c); with n_j such classes,
    consistency_j = |sum_c u_cj| / sqrt(n_j): about 1 for unrelated directions (noise bits),
    sqrt(n_j) when every class agrees. Bits split in fewer than `min_classes` classes
    (class-determined or dead bits) score 0.
  t-SNE: scikit-learn's TSNE in 3-D on precomputed Hamming distances of a random subsample.
"""

import os
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from bits_jax.evaluate import common


def binary_entropy(p) -> np.ndarray:
  """Entropy in bits of Bernoulli(p), elementwise; 0 at p in {0, 1}."""
  p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
  return np.nan_to_num(h, nan=0.0)


def bit_correlation(bits) -> np.ndarray:
  """Pearson correlation [b, b] of 0/1 bits [n, b]; a constant bit has zero
  correlation with every other bit (and 1 with itself)."""
  x = np.asarray(bits, np.float64)
  x = x - x.mean(axis=0)
  std = np.sqrt((x * x).mean(axis=0))
  live = std > 0
  z = np.where(live, x / np.where(live, std, 1.0), 0.0)
  corr = (z.T @ z) / x.shape[0]
  np.fill_diagonal(corr, 1.0)
  return np.clip(corr, -1.0, 1.0)


def effective_rank(logits) -> tuple[float, np.ndarray]:
  """(exp of the entropy of normalized singular values, singular values)."""
  s = np.linalg.svd(np.asarray(logits, np.float64), compute_uv=False)
  total = s.sum()
  if total <= 0:
    return 0.0, s
  p = s / total
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum())), s


def bit_label_mutual_information(bits, labels, classes) -> np.ndarray:
  """I(bit_j; label) in bits for each bit: [b]."""
  bits = np.asarray(bits, np.float64)
  labels = np.asarray(labels)
  class_frac = np.array([(labels == c).mean() for c in classes])
  activation = np.stack([bits[labels == c].mean(axis=0) for c in classes])
  conditional = (class_frac[:, None] * binary_entropy(activation)).sum(axis=0)
  return np.maximum(binary_entropy(bits.mean(axis=0)) - conditional, 0.0)


def _pairwise_hamming(codes: np.ndarray) -> np.ndarray:
  return (codes[:, None, :] != codes[None, :, :]).sum(axis=-1)


def analyze_codes(
    logits,
    labels,
    *,
    mask=None,
    specific_on: float = 0.9,
    specific_off: float = 0.1,
    shared_on: float = 0.5,
) -> dict[str, Any]:
  """Statistics of the binary codes logits > 0.

  Args:
    logits: [n, b] teacher projection-head logits.
    labels: [n] integer class ids.
    mask: optional [n] bool; False rows (padding) are ignored.
    specific_on, specific_off, shared_on: thresholds of the definitions in
      the module docstring.

  Returns:
    A flat dict. Floats: bit_balance_{mean,min,max}, dead_bits_frac,
    bit_entropy_mean, bit_corr_mean_abs_offdiag, logit_effective_rank,
    logit_effective_rank_frac, label_entropy, bit_label_mi_{mean,max},
    class_specific_bits_frac, shared_bits_frac,
    classes_with_specific_bit_frac, distinct_codes, code_usage,
    prototype_hamming_{mean,min}, prototype_collisions, num_bits, num_images,
    num_classes. Arrays (for plots): bit_balance [b], bit_entropy [b],
    bit_corr [b, b], bit_label_mi [b], singular_values [min(n, b)], classes
    [C], class_bit_activation [C, b], class_specific_owner [b] (class id or
    -1), shared_bits [b] bool, prototype_codes [C, b] bool,
    prototype_hamming [C, C].
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [n, bits], got shape {logits.shape}.")
  if labels.shape != logits.shape[:1]:
    raise ValueError(f"labels must be [n] = [{logits.shape[0]}], got {labels.shape}.")
  common.check_finite(logits, "logits", mask)
  if mask is not None:
    mask = np.asarray(mask, bool)
    logits, labels = logits[mask], labels[mask]
  n, b = logits.shape
  if n < 2:
    raise ValueError(f"need at least 2 (unmasked) images, got {n}.")
  bits = logits > 0
  out: dict[str, Any] = {"num_bits": float(b), "num_images": float(n)}

  balance = bits.mean(axis=0)
  entropy = binary_entropy(balance)
  out.update(
      bit_balance=balance,
      bit_entropy=entropy,
      bit_balance_mean=float(balance.mean()),
      bit_balance_min=float(balance.min()),
      bit_balance_max=float(balance.max()),
      dead_bits_frac=float(((balance == 0) | (balance == 1)).mean()),
      bit_entropy_mean=float(entropy.mean()),
  )

  corr = bit_correlation(bits)
  off_diag = ~np.eye(b, dtype=bool)
  out.update(
      bit_corr=corr,
      bit_corr_mean_abs_offdiag=(float(np.abs(corr[off_diag]).mean()) if b > 1 else 0.0),
  )

  erank, singular_values = effective_rank(logits)
  out.update(
      singular_values=singular_values,
      logit_effective_rank=erank,
      logit_effective_rank_frac=erank / min(n, b),
  )

  classes = np.unique(labels)
  class_frac = np.array([(labels == c).mean() for c in classes])
  mi = bit_label_mutual_information(bits, labels, classes)
  out.update(
      classes=classes,
      num_classes=float(len(classes)),
      label_entropy=float(-(class_frac * np.log2(class_frac)).sum()),
      bit_label_mi=mi,
      bit_label_mi_mean=float(mi.mean()),
      bit_label_mi_max=float(mi.max()),
  )

  activation = np.stack([bits[labels == c].mean(axis=0) for c in classes])
  ones_per_class = np.stack([bits[labels == c].sum(axis=0) for c in classes])
  counts = np.array([(labels == c).sum() for c in classes])
  # Fraction of images outside class c with bit j on: [C, b].
  outside = (ones_per_class.sum(0, keepdims=True) - ones_per_class) / np.maximum(n - counts, 1)[
      :, None
  ]
  specific = (activation >= specific_on) & (outside <= specific_off)
  if len(classes) < 2:
    specific[:] = False  # "Specific to one class" needs another class.
  owner = np.where(specific.any(axis=0), classes[specific.argmax(axis=0)], -1)
  shared = (activation >= shared_on).sum(axis=0) >= -(-len(classes) // 2)
  out.update(
      class_bit_activation=activation,
      class_specific_owner=owner,
      shared_bits=shared,
      class_specific_bits_frac=float((owner >= 0).mean()),
      shared_bits_frac=float(shared.mean()),
      classes_with_specific_bit_frac=float(specific.any(axis=1).mean()),
  )

  packed = np.packbits(bits, axis=1)
  distinct = len(np.unique(packed, axis=0))
  out.update(distinct_codes=float(distinct), code_usage=distinct / n)

  prototypes = activation > 0.5
  proto_dist = _pairwise_hamming(prototypes)
  pairs = ~np.eye(len(classes), dtype=bool)
  out.update(prototype_codes=prototypes, prototype_hamming=proto_dist)
  if len(classes) > 1:
    out.update(
        prototype_hamming_mean=float(proto_dist[pairs].mean()),
        prototype_hamming_min=float(proto_dist[pairs].min()),
        prototype_collisions=float((proto_dist[pairs] == 0).sum() / 2),
    )
  else:
    out.update(prototype_hamming_mean=0.0, prototype_hamming_min=0.0, prototype_collisions=0.0)
  return out


def scalar_metrics(analysis: dict[str, Any], prefix: str = "codes/") -> dict[str, float]:
  """The float entries of an analysis, prefixed, ready for a metric writer."""
  return {
      prefix + k: float(v)
      for k, v in analysis.items()
      if isinstance(v, (float, int, np.floating, np.integer))
  }


# ------------------------------------------------------------------- the code as a language


def contiguous_groups(num_bits: int, size: int = 8) -> np.ndarray:
  """Bit indices [num_bits // size, size] of contiguous blocks."""
  if not 1 <= size <= num_bits:
    raise ValueError(f"group size {size} must lie in [1, {num_bits}] (the code's bits).")
  return np.arange(num_bits // size * size).reshape(-1, size)


def random_groups(num_bits: int, size: int = 8, seed: int = 0) -> np.ndarray:
  """A seeded random partition of the bits into [num_bits // size, size] groups."""
  perm = np.random.default_rng(seed).permutation(num_bits)
  return np.sort(perm[: num_bits // size * size].reshape(-1, size), axis=1)


def group_entropy(bits, groups) -> tuple[np.ndarray, np.ndarray]:
  """Plug-in entropies (bits) of each group's joint value, and Miller-Madow corrected ones.

  Args:
    bits: [n, B] bool codes.
    groups: [G, k] bit indices, k <= 20.

  Returns:
    (entropy [G], entropy + (K - 1) / (2 n ln 2) [G]) with K the observed symbols per group.
  """
  bits = np.asarray(bits, bool)
  groups = np.asarray(groups)
  n, k = bits.shape[0], groups.shape[1]
  if k > 20:
    raise ValueError(f"groups of {k} bits have 2^{k} symbols: use at most 20 bits per group.")
  weights = (1 << np.arange(k)).astype(np.int64)
  plug_in, corrected = [], []
  for group in groups:
    counts = np.bincount(bits[:, group] @ weights, minlength=1 << k)
    p = counts[counts > 0] / n
    h = float(-(p * np.log2(p)).sum())
    plug_in.append(h)
    corrected.append(h + (len(p) - 1) / (2 * n * np.log(2)))
  return np.asarray(plug_in), np.asarray(corrected)


def hamming_matrix(bits) -> np.ndarray:
  """Pairwise Hamming distances [n, n] float32 of bool codes [n, B] (two matmuls, exact)."""
  x = np.asarray(bits, np.float32)
  return x @ (1 - x).T + (1 - x) @ x.T


def tsne_codes(
    bits, *, num_points: int = 2000, seed: int = 0, max_iter: int = 1000
) -> tuple[np.ndarray, np.ndarray, float]:
  """3-D t-SNE of a random subsample of the codes with Hamming distance.

  Returns:
    (embedding [m, 3], the subsampled rows [m], the fit's KL divergence).
  """
  from sklearn import manifold  # pylint: disable=g-import-not-at-top

  bits = np.asarray(bits, bool)
  n = bits.shape[0]
  rows = np.sort(np.random.default_rng(seed).choice(n, min(n, num_points), replace=False))
  if len(rows) < 5:
    raise ValueError(f"t-SNE needs at least 5 codes, got {len(rows)}.")
  dist = hamming_matrix(bits[rows]) / bits.shape[1]
  tsne = manifold.TSNE(
      n_components=3,
      metric="precomputed",
      init="random",
      perplexity=min(30.0, (len(rows) - 1) / 3),
      random_state=seed,
      max_iter=max_iter,
  )
  embedding = tsne.fit_transform(dist)
  return embedding, rows, float(tsne.kl_divergence_)


def attribute_consistency(
    bits, labels, descriptors, *, min_images: int = 2, min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cross-class consistency of each bit (module docstring) and its mean direction.

  Args:
    bits: [n, B] bool; labels: [n] int; descriptors: [n, D] (e.g. backbone features).
    min_images: images needed with the bit on and with it off for a class to count.
    min_classes: classes needed for a nonzero score.

  Returns:
    (consistency [B], eligible classes per bit n_j [B], unit mean direction [B, D]).
  """
  bits = np.asarray(bits, bool)
  labels = np.asarray(labels)
  desc = np.asarray(descriptors, np.float64)
  n_bits = bits.shape[1]
  total = np.zeros((n_bits, desc.shape[1]))
  count = np.zeros(n_bits)
  for c in np.unique(labels):
    rows = labels == c
    b, x = bits[rows].astype(np.float64), desc[rows]
    on = b.sum(axis=0)
    off = len(x) - on
    sum_on = b.T @ x  # [B, D]
    sum_off = x.sum(axis=0)[None] - sum_on
    ok = (on >= min_images) & (off >= min_images)
    delta = sum_on / np.maximum(on, 1)[:, None] - sum_off / np.maximum(off, 1)[:, None]
    norm = np.linalg.norm(delta, axis=1)
    ok &= norm > 0
    total[ok] += delta[ok] / norm[ok, None]
    count += ok
  length = np.linalg.norm(total, axis=1)
  score = np.where(count >= min_classes, length / np.sqrt(np.maximum(count, 1)), 0.0)
  direction = total / np.maximum(length, 1e-30)[:, None]
  return score, count, direction


def bit_image_grid(
    bits, labels, images, bit: int, classes: Sequence[int], *, per_side: int = 4, seed: int = 0
) -> list[list[Optional[np.ndarray]]]:
  """Rows of Fig. 3: for each class, `per_side` images with `bit` on then `per_side` with it
  off (random picks; None where the class has fewer)."""
  bits = np.asarray(bits, bool)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  rows = []
  for c in classes:
    row = []
    for value in (True, False):
      pool = np.flatnonzero((labels == c) & (bits[:, bit] == value))
      pick = rng.choice(pool, min(per_side, len(pool)), replace=False) if len(pool) else []
      row += [images[i] for i in pick] + [None] * (per_side - len(pick))
    rows.append(row)
  return rows


_LABEL_KEYS = (
    "label_entropy",
    "bit_label_mi_mean",
    "bit_label_mi_max",
    "class_specific_bits_frac",
    "shared_bits_frac",
    "classes_with_specific_bit_frac",
    "prototype_hamming_mean",
    "prototype_hamming_min",
    "prototype_collisions",
    "num_classes",
)


@common.register("codes")
def run(
    ctx,
    *,
    split: str = "test",
    block_size: int = 8,
    tsne_points: int = 2000,
    tsne: bool = True,
    tsne_max_iter: int = 1000,
    descriptors: str = "cls",
    top_bits: int = 10,
    grid_bits: int = 3,
    grid_classes: int = 6,
    grid_images: int = 4,
    max_bits: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
  """Statistics of the codes (logits > 0) of `split`, read as a language (Sec. 5.5).

  Figures need ctx.out_dir; the bit-conditioned image grids (Fig. 3) also need int labels
  and `ctx.images(split, rows)` (uint8 [len(rows), H, W, C] of the given feature rows), which
  reads only the images shown. t-SNE on 2000 points took 96 s on the 2-core CPU (load 9):
  pass tsne=False for evaluations in training.
  Heads other than BITS's with more than `max_bits` outputs (DINO prototypes) are refused.

  Returns:
    analyze_codes' scalars (label statistics only for int labels), 'block_entropy_mean',
    'block_entropy_min', 'block_entropy_mm_mean', 'random_group_entropy_mean',
    'random_group_entropy_mm_mean', 'attribute_consistency_top1', 'attribute_bits' (the
    `top_bits` most consistent bits, comma-separated), 'tsne_kl'.
  """
  feats = ctx.features(split)
  if "logits" not in feats:
    raise ValueError("the evaluated weights have no projection head: no codes to analyse.")
  if not common.head_is_message(ctx, np.shape(feats["logits"])[1], max_bits):
    raise ValueError(
        f"the head has {np.shape(feats['logits'])[1]} outputs (> max_bits={max_bits}): not a "
        "BITS message (DINO prototypes?); evaluate codes only for BITS heads."
    )
  mask = np.asarray(feats["mask"], bool)
  logits, labels = np.asarray(feats["logits"])[mask], np.asarray(feats["label"])[mask]
  multi = labels.ndim == 2
  analysis = analyze_codes(logits, np.zeros(len(logits), int) if multi else labels)
  out: dict[str, Any] = {
      k: v
      for k, v in scalar_metrics(analysis, prefix="").items()
      if not (multi and k in _LABEL_KEYS)
  }
  bits = logits > 0
  n_bits = bits.shape[1]
  block, block_mm = group_entropy(bits, contiguous_groups(n_bits, block_size))
  rand, rand_mm = group_entropy(bits, random_groups(n_bits, block_size, seed))
  out.update(
      block_size=float(block_size),
      block_entropy_mean=float(block.mean()),
      block_entropy_min=float(block.min()),
      block_entropy_mm_mean=float(block_mm.mean()),
      random_group_entropy_mean=float(rand.mean()),
      random_group_entropy_mm_mean=float(rand_mm.mean()),
  )

  ranked = np.zeros(0, int)
  if not multi and descriptors in feats:
    score, _, _ = attribute_consistency(bits, labels, np.asarray(feats[descriptors])[mask])
    ranked = np.argsort(-score, kind="stable")
    ranked = ranked[score[ranked] > 0][:top_bits]
    out["attribute_consistency_top1"] = float(score[ranked[0]]) if len(ranked) else 0.0
    out["attribute_bits"] = ",".join(str(j) for j in ranked)

  plot_labels = labels.argmax(axis=1) if multi else labels
  embedding = rows = None
  if tsne:
    embedding, rows, out["tsne_kl"] = tsne_codes(
        bits, num_points=tsne_points, seed=seed, max_iter=tsne_max_iter
    )
  if ctx.out_dir is None:
    return out

  from bits_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

  os.makedirs(ctx.out_dir, exist_ok=True)
  paths = [
      plots.plot_bit_balance(analysis["bit_balance"], os.path.join(ctx.out_dir, "bit_balance.png")),
      plots.plot_correlation(
          analysis["bit_corr"], os.path.join(ctx.out_dir, "bit_correlation.png")
      ),
  ]
  if not multi:
    paths.append(
        plots.plot_class_activation(
            analysis["class_bit_activation"], os.path.join(ctx.out_dir, "class_bit_activation.png")
        )
    )
  if embedding is not None:
    paths.append(
        plots.plot_embedding_3d(
            embedding,
            plot_labels[rows],
            os.path.join(ctx.out_dir, "codes_tsne.png"),
            "3-D t-SNE of the codes (Hamming)",
        )
    )
  images_fn = getattr(ctx, "images", None)
  if len(ranked) and grid_bits > 0:
    if images_fn is None:
      logging.info("codes: no ctx.images: bit-conditioned image grids skipped.")
    else:
      paths += _bit_grids(
          ctx,
          split,
          bits,
          labels,
          np.asarray(feats[descriptors])[mask],
          np.flatnonzero(mask),
          ranked[:grid_bits],
          grid_classes,
          grid_images,
          seed,
      )
  for path in paths:
    ctx.add_plot(path)
  return out


def _bit_grids(
    ctx, split, bits, labels, desc, feature_rows, grid_bits, grid_classes, grid_images, seed
) -> list[str]:
  """Fig. 3 PNGs for each bit of `grid_bits`; images read once, only the rows shown.

  bits [n, B], labels [n], desc [n, D]: the valid rows, which are rows `feature_rows` [n] of
  the split's features (and of `ctx.images(split, rows)`).
  """
  from bits_jax.evaluate import plots  # pylint: disable=g-import-not-at-top

  _, _, direction = attribute_consistency(bits, labels, desc, min_images=1)
  grids = []
  for j in grid_bits:
    classes = _grid_classes(bits, labels, desc, j, direction[j], grid_classes)
    cells = bit_image_grid(
        bits, labels, np.arange(len(bits)), int(j), classes, per_side=grid_images, seed=seed
    )
    grids.append((int(j), classes, cells))
  shown = sorted({int(i) for _, _, cells in grids for row in cells for i in row if i is not None})
  if not shown:
    return []
  images = np.asarray(ctx.images(split, feature_rows[shown]))
  where = {i: k for k, i in enumerate(shown)}
  paths = []
  for j, classes, cells in grids:
    grid = [[None if i is None else images[where[int(i)]] for i in row] for row in cells]
    paths.append(
        plots.plot_image_grid(
            grid,
            [f"class {c}" for c in classes],
            [f"bit {j} on"] * grid_images + [f"bit {j} off"] * grid_images,
            os.path.join(ctx.out_dir, f"bit_{j}_grid.png"),
            f"images conditioned on bit {j}",
        )
    )
  return paths


def _grid_classes(bits, labels, desc, bit, direction, limit) -> list[int]:
  """Classes with the bit both on and off, most aligned with its mean direction first."""
  scored = []
  for c in np.unique(labels):
    rows = labels == c
    on = bits[rows, bit]
    if on.all() or not on.any():
      continue
    delta = desc[rows][on].mean(0) - desc[rows][~on].mean(0)
    scored.append((-float(delta @ direction / max(np.linalg.norm(delta), 1e-30)), int(c)))
  return [c for _, c in sorted(scored)[:limit]]
