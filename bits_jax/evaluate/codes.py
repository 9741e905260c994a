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
"""
from typing import Any

import numpy as np


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


def analyze_codes(logits, labels, *, mask=None,
                  specific_on: float = 0.9, specific_off: float = 0.1,
                  shared_on: float = 0.5) -> dict[str, Any]:
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
    raise ValueError(f"labels must be [n] = [{logits.shape[0]}], got "
                     f"{labels.shape}.")
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
  out.update(bit_balance=balance, bit_entropy=entropy,
             bit_balance_mean=float(balance.mean()),
             bit_balance_min=float(balance.min()),
             bit_balance_max=float(balance.max()),
             dead_bits_frac=float(((balance == 0) | (balance == 1)).mean()),
             bit_entropy_mean=float(entropy.mean()))

  corr = bit_correlation(bits)
  off_diag = ~np.eye(b, dtype=bool)
  out.update(bit_corr=corr, bit_corr_mean_abs_offdiag=(
      float(np.abs(corr[off_diag]).mean()) if b > 1 else 0.0))

  erank, singular_values = effective_rank(logits)
  out.update(singular_values=singular_values, logit_effective_rank=erank,
             logit_effective_rank_frac=erank / min(n, b))

  classes = np.unique(labels)
  class_frac = np.array([(labels == c).mean() for c in classes])
  mi = bit_label_mutual_information(bits, labels, classes)
  out.update(classes=classes, num_classes=float(len(classes)),
             label_entropy=float(-(class_frac * np.log2(class_frac)).sum()),
             bit_label_mi=mi, bit_label_mi_mean=float(mi.mean()),
             bit_label_mi_max=float(mi.max()))

  activation = np.stack([bits[labels == c].mean(axis=0) for c in classes])
  ones_per_class = np.stack([bits[labels == c].sum(axis=0) for c in classes])
  counts = np.array([(labels == c).sum() for c in classes])
  # Fraction of images outside class c with bit j on: [C, b].
  outside = ((ones_per_class.sum(0, keepdims=True) - ones_per_class)
             / np.maximum(n - counts, 1)[:, None])
  specific = (activation >= specific_on) & (outside <= specific_off)
  if len(classes) < 2:
    specific[:] = False  # "Specific to one class" needs another class.
  owner = np.where(specific.any(axis=0), classes[specific.argmax(axis=0)], -1)
  shared = ((activation >= shared_on).sum(axis=0)
            >= -(-len(classes) // 2))
  out.update(class_bit_activation=activation, class_specific_owner=owner,
             shared_bits=shared,
             class_specific_bits_frac=float((owner >= 0).mean()),
             shared_bits_frac=float(shared.mean()),
             classes_with_specific_bit_frac=float(specific.any(axis=1).mean()))

  packed = np.packbits(bits, axis=1)
  distinct = len(np.unique(packed, axis=0))
  out.update(distinct_codes=float(distinct), code_usage=distinct / n)

  prototypes = activation > 0.5
  proto_dist = _pairwise_hamming(prototypes)
  pairs = ~np.eye(len(classes), dtype=bool)
  out.update(prototype_codes=prototypes, prototype_hamming=proto_dist)
  if len(classes) > 1:
    out.update(prototype_hamming_mean=float(proto_dist[pairs].mean()),
               prototype_hamming_min=float(proto_dist[pairs].min()),
               prototype_collisions=float((proto_dist[pairs] == 0).sum() / 2))
  else:
    out.update(prototype_hamming_mean=0.0, prototype_hamming_min=0.0,
               prototype_collisions=0.0)
  return out


def scalar_metrics(analysis: dict[str, Any],
                   prefix: str = "codes/") -> dict[str, float]:
  """The float entries of an analysis, prefixed, ready for a metric writer."""
  return {prefix + k: float(v) for k, v in analysis.items()
          if isinstance(v, (float, int, np.floating, np.integer))}
