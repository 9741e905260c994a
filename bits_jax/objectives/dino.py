"""DINO (Caron et al., 2021): the student matches the teacher's centered, sharpened softmax.

With K prototypes, teacher scores `t_g` on the G global views and student scores `s_v` on
all V views (`[batch, K]` each), a center `c: [K]` and temperatures `tau_t(step)`, `tau_s`:

  q_g = softmax((t_g - c) / tau_t)                    (no gradient)
  loss = mean_{g, v != g} mean_batch sum_k -q_g[k] * log softmax(s_v / tau_s)[k]
  c <- m * c + (1 - m) * mean_{g, batch} t_g           (m = center_momentum = 0.9)

Settings in `config.objective.dino`: `tau_t` warms up linearly from `warmup_teacher_temp`
(0.04) to `teacher_temp` (0.07) over `warmup_teacher_temp_steps`, then stays;
`tau_s = student_temp` (0.1). The prototypes (`head/last_layer`) are frozen for the first
`freeze_last_layer_steps` (`frozen_params`).
The center is updated with the mean over the global batch: inside `jax.jit` on a mesh the
mean of a batch-sharded array is reduced across devices, as DINO's all-reduce does.
"""

import jax
import jax.numpy as jnp
import ml_collections

from bits_jax.models import heads
from bits_jax.objectives import common


def make_head(config: ml_collections.ConfigDict):
  """3-layer MLP -> bottleneck (0: 256) -> L2 norm -> weight-normalized `out_dim` prototypes."""
  head, dino = config.objective.head, config.objective.dino
  return heads.DinoHead(
      out_dim=dino.out_dim,
      hidden_dim=head.hidden_dim,
      bottleneck_dim=head.bottleneck_dim or heads.DEFAULT_BOTTLENECK,
      num_layers=head.num_layers,
      norm_last_layer=dino.norm_last_layer,
      dtype=config.get("dtype", "float32"),
  )


def init_state(config: ml_collections.ConfigDict):
  """The center of the teacher scores, `{'center': [out_dim]}` zeros."""
  return {"center": jnp.zeros((config.objective.dino.out_dim,), jnp.float32)}


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Impossible DINO settings, each with its fix (called by config validation)."""
  dino = config.objective.dino
  problems = common.positive(
      config,
      "dino",
      ("student_temp", "teacher_temp", "warmup_teacher_temp"),
      "DINO: student 0.1, teacher 0.04 -> 0.07",
  )
  if not 0 <= dino.center_momentum < 1:
    problems.append(
        f"config.objective.dino.center_momentum={dino.center_momentum} must be "
        "in [0, 1) (DINO: 0.9)."
    )
  if dino.out_dim < 1:
    problems.append(f"config.objective.dino.out_dim={dino.out_dim} must be >= 1 (DINO: 65536).")
  return problems


def teacher_temperature(step, config: ml_collections.ConfigDict) -> jax.Array:
  """Linear warm-up from `warmup_teacher_temp` to `teacher_temp`, then constant."""
  dino = config.objective.dino
  start, end = dino.warmup_teacher_temp, dino.teacher_temp
  warmup = dino.warmup_teacher_temp_steps
  if warmup <= 0:
    return jnp.asarray(end, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)
  return start + (end - start) * frac


def frozen_params(config: ml_collections.ConfigDict) -> common.FrozenParams | None:
  """The prototypes (`head/last_layer`) for the first `freeze_last_layer_steps` steps.

  DINO keeps them fixed in the first epoch: no update (weight decay included) moves them and
  their Adam state stays fresh until then.
  """
  steps = config.objective.dino.freeze_last_layer_steps
  return common.FrozenParams("last_layer", int(steps)) if steps else None


def teacher_probs(teacher_out: jax.Array, center: jax.Array, temperature) -> jax.Array:
  """Centered, sharpened teacher softmax, no gradient. `[G, batch, K] -> [G, batch, K]`."""
  logits = (teacher_out.astype(jnp.float32) - center) / temperature
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def updated_center(center: jax.Array, teacher_out: jax.Array, momentum: float) -> jax.Array:
  """EMA of the mean teacher score over views and the (global) batch. `center: [K]`."""
  batch_center = jnp.mean(teacher_out.astype(jnp.float32), axis=(0, 1))
  return jax.lax.stop_gradient(center * momentum + batch_center * (1.0 - momentum))


def loss(
    student_out: jax.Array,
    teacher_out: jax.Array,
    state,
    *,
    step,
    config: ml_collections.ConfigDict,
    batch_shards: int = 1,
):
  """DINO objective.

  Args:
    student_out: [V, batch, K] prototype scores for all views (G global first).
    teacher_out: [G, batch, K] for the global views.
    state: {'center': [K]}.
    step: the global step (drives the teacher temperature warm-up).
    config: reads `config.objective.dino`.
    batch_shards: unused (the center is a global-batch mean).
  Returns:
    (loss, (new_state, metrics)).
  """
  del batch_shards
  dino = config.objective.dino
  pairs = common.cross_view_pairs(teacher_out.shape[0], student_out.shape[0], "DINO")
  temp = teacher_temperature(step, config)
  q = teacher_probs(teacher_out, state["center"], temp)
  log_p = jax.nn.log_softmax(student_out.astype(jnp.float32) / dino.student_temp, axis=-1)
  total = common.mean_over_pairs(lambda g, v: jnp.mean(-jnp.sum(q[g] * log_p[v], axis=-1)), pairs)
  agreement = common.mean_over_pairs(
      lambda g, v: jnp.mean((jnp.argmax(q[g], -1) == jnp.argmax(log_p[v], -1)).astype(jnp.float32)),
      pairs,
  )
  new_state = {"center": updated_center(state["center"], teacher_out, dino.center_momentum)}
  teacher_entropy = jnp.mean(-jnp.sum(q * jnp.log(jnp.clip(q, 1e-30)), axis=-1))
  mean_q = jnp.mean(q, axis=(0, 1))
  metrics = {
      "loss": total,
      "teacher_temperature": temp,
      "teacher_entropy": teacher_entropy,
      # Entropy of the batch-mean teacher distribution: low means collapse to few prototypes.
      "teacher_marginal_entropy": -jnp.sum(mean_q * jnp.log(jnp.clip(mean_q, 1e-30))),
      "agreement_accuracy": agreement,
  }
  return total, (new_state, metrics)


OBJECTIVE = common.Objective(
    name="dino",
    make_head=make_head,
    loss=loss,
    init_state=init_state,
    frozen_params=frozen_params,
    config_problems=config_problems,
)
