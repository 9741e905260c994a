"""BITS: the teacher sends binary messages, the student predicts them bit by bit.

Messages are the teacher's head logits thresholded at zero (one bit per output unit, a
multi-label code). The student predicts the messages of the *other* views with an element-wise
binary cross-entropy; a coding-rate term on the student's global-view logits keeps the channel
used (bits diverse and decorrelated).

  loss = bce_weight * agreement
         - coding_rate_weight * (d + n) / (d * n) * mean_g coding_rate(s_g, eps)

with n the global batch and d the number of bits.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bits_jax.models import heads
from bits_jax.objectives import coding_rate as coding_rate_lib

NAME = "bits"


def make_head(config: ml_collections.ConfigDict):
  """The projection head whose outputs are the bit logits."""
  return heads.BitsHead(
      bits=config.bits,
      hidden_dim=config.head_hidden_dim,
      bottleneck_dim=config.head_bottleneck_dim,
      num_layers=config.head_layers,
      dtype=config.get("dtype", "float32"))


def init_state(config: ml_collections.ConfigDict):
  """BITS keeps no state between steps (no centering, no temperatures)."""
  del config
  return {}


def messages(teacher_logits: jax.Array) -> jax.Array:
  """{0, 1} messages, no gradient. `teacher_logits: [..., bits]`."""
  return jax.lax.stop_gradient((teacher_logits > 0).astype(jnp.float32))


def cross_view_pairs(num_teacher_views: int, num_student_views: int):
  """(teacher view g, student view v) index pairs with v != g."""
  return [(g, v) for g in range(num_teacher_views)
          for v in range(num_student_views) if v != g]


def agreement(student_logits: jax.Array, teacher_messages: jax.Array):
  """Mean cross-view BCE and bit accuracy.

  Args:
    student_logits: [V, batch, bits], global views first, then local views.
    teacher_messages: [G, batch, bits] in {0, 1}.
  Returns:
    (bce, accuracy): float32 scalars averaged over pairs, batch and bits.
  """
  pairs = cross_view_pairs(teacher_messages.shape[0], student_logits.shape[0])
  if not pairs:
    raise ValueError("BITS needs at least two views (two global crops, or one global crop "
                     "and one local crop): set num_global_crops=2 or num_local_crops>0.")
  bce, acc = [], []
  for g, v in pairs:
    s = student_logits[v].astype(jnp.float32)
    bce.append(jnp.mean(optax.sigmoid_binary_cross_entropy(s, teacher_messages[g])))
    acc.append(jnp.mean(((s > 0).astype(jnp.float32) == teacher_messages[g])
                        .astype(jnp.float32)))
  return jnp.mean(jnp.stack(bce)), jnp.mean(jnp.stack(acc))


def bit_statistics(teacher_messages: jax.Array):
  """Balance (fraction of ones) and mean per-bit entropy in bits. `[G, batch, bits]`."""
  p = jnp.mean(teacher_messages, axis=(0, 1))  # [bits]
  q = jnp.clip(p, 1e-7, 1 - 1e-7)
  entropy = -(q * jnp.log2(q) + (1 - q) * jnp.log2(1 - q))
  entropy = jnp.where((p <= 0) | (p >= 1), 0.0, entropy)
  return jnp.mean(p), jnp.mean(entropy)


def loss(student_logits: jax.Array, teacher_logits: jax.Array, state, *, step,
         config: ml_collections.ConfigDict):
  """BITS objective.

  Args:
    student_logits: [V, batch, bits] for all views (G global first, then local).
    teacher_logits: [G, batch, bits] for the global views.
    state: objective state (empty for BITS).
    step: the global step (unused by BITS).
    config: needs bits-related keys `bce_weight`, `coding_rate_weight`, `coding_rate_eps`.
  Returns:
    (loss, (new_state, metrics)).
  """
  del step
  num_global = teacher_logits.shape[0]
  msgs = messages(teacher_logits)
  bce, accuracy = agreement(student_logits, msgs)
  n, d = student_logits.shape[1], student_logits.shape[2]
  rates = [coding_rate_lib.coding_rate(student_logits[g], config.coding_rate_eps)
           for g in range(num_global)]
  rate = jnp.mean(jnp.stack(rates))
  rate_scale = (d + n) / (d * n)
  total = config.bce_weight * bce - config.coding_rate_weight * rate_scale * rate
  balance, entropy = bit_statistics(msgs)
  metrics = {
      "loss": total,
      "agreement_bce": bce,
      "coding_rate": rate,
      "bit_balance": balance,
      "bit_entropy": entropy,
      "agreement_accuracy": accuracy,
  }
  return total, (state, metrics)
