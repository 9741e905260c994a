"""BITS: the teacher sends binary messages, the student predicts them bit by bit.

Messages are the teacher's head logits thresholded at zero (one bit per output unit, a
multi-label code). The student predicts the messages of the *other* views with an element-wise
binary cross-entropy; a coding-rate term on the student's global-view logits keeps the channel
used (bits diverse and decorrelated).

  loss = bce_weight * agreement
         - coding_rate_weight * (d + n) / (d * n) * mean_g coding_rate(s_g, eps)

with n the global batch and d the number of bits (settings: `config.objective.bits`). The
head is re-initialised every `reset_every_steps` / `reset_every_epochs` (BITS-reset).
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bits_jax.models import heads
from bits_jax.objectives import coding_rate as coding_rate_lib
from bits_jax.objectives import common


def make_head(config: ml_collections.ConfigDict):
  """The projection head whose outputs are the bit logits."""
  head = config.objective.head
  return heads.BitsHead(
      bits=config.objective.bits.num_bits,
      hidden_dim=head.hidden_dim,
      bottleneck_dim=head.bottleneck_dim,
      num_layers=head.num_layers,
      dtype=config.get("dtype", "float32"),
  )


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Impossible BITS settings, each with its fix (called by config validation)."""
  bits = config.objective.bits
  problems = common.positive(
      config, "bits", ("num_bits",), "the number of bits in each message; the paper uses 256"
  )
  problems += common.positive(
      config, "bits", ("eps",), "the distortion in the coding rate, e.g. 0.05"
  )
  for key in ("bce_weight", "coding_rate_weight"):
    if bits[key] is None or bits[key] < 0:
      problems.append(f"config.objective.bits.{key}={bits[key]} must be >= 0 (0 disables it).")
  return problems


def messages(teacher_logits: jax.Array) -> jax.Array:
  """{0, 1} messages, no gradient. `teacher_logits: [..., bits]`."""
  return jax.lax.stop_gradient((teacher_logits > 0).astype(jnp.float32))


def agreement(student_logits: jax.Array, teacher_messages: jax.Array):
  """Mean cross-view BCE and bit accuracy.

  Args:
    student_logits: [V, batch, bits], global views first, then local views.
    teacher_messages: [G, batch, bits] in {0, 1}.
  Returns:
    (bce, accuracy): float32 scalars averaged over pairs, batch and bits.
  """
  pairs = common.cross_view_pairs(teacher_messages.shape[0], student_logits.shape[0], "BITS")
  s = student_logits.astype(jnp.float32)
  bce = common.mean_over_pairs(
      lambda g, v: jnp.mean(optax.sigmoid_binary_cross_entropy(s[v], teacher_messages[g])), pairs
  )
  accuracy = common.mean_over_pairs(
      lambda g, v: jnp.mean(
          ((s[v] > 0).astype(jnp.float32) == teacher_messages[g]).astype(jnp.float32)
      ),
      pairs,
  )
  return bce, accuracy


def bit_statistics(teacher_messages: jax.Array):
  """Balance (fraction of ones) and mean per-bit entropy in bits. `[G, batch, bits]`."""
  p = jnp.mean(teacher_messages, axis=(0, 1))  # [bits]
  q = jnp.clip(p, 1e-7, 1 - 1e-7)
  entropy = -(q * jnp.log2(q) + (1 - q) * jnp.log2(1 - q))
  entropy = jnp.where((p <= 0) | (p >= 1), 0.0, entropy)
  return jnp.mean(p), jnp.mean(entropy)


def loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    state,
    *,
    step,
    config: ml_collections.ConfigDict,
):
  """BITS objective.

  Args:
    student_logits: [V, batch, bits] for all views (G global first, then local).
    teacher_logits: [G, batch, bits] for the global views.
    state: objective state (empty for BITS).
    step: the global step (unused by BITS).
    config: reads `config.objective.bits` (bce_weight, coding_rate_weight, eps).
  Returns:
    (loss, (new_state, metrics)).
  """
  del step
  settings = config.objective.bits
  num_global = teacher_logits.shape[0]
  msgs = messages(teacher_logits)
  bce, accuracy = agreement(student_logits, msgs)
  n, d = student_logits.shape[1], student_logits.shape[2]
  rates = [coding_rate_lib.coding_rate(student_logits[g], settings.eps) for g in range(num_global)]
  rate = jnp.mean(jnp.stack(rates))
  rate_scale = common.coding_rate_balance(n, d)
  total = settings.bce_weight * bce - settings.coding_rate_weight * rate_scale * rate
  balance, entropy = bit_statistics(msgs)
  metrics = {
      "loss": total,
      "agreement_bce": bce,
      "coding_rate": rate,
      "bit_balance": balance,
      "bit_entropy": entropy,
      "agreement_accuracy": accuracy,
      "bit_usage": jnp.mean(msgs, axis=(0, 1)),  # [bits]: how often each bit is on
  }
  return total, (state, metrics)


OBJECTIVE = common.Objective(
    name="bits",
    make_head=make_head,
    loss=loss,
    config_problems=config_problems,
)
