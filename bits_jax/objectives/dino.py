"""DINO (Caron et al., 2021): the student matches the teacher's centered, sharpened softmax.

With K prototypes, teacher scores `t_g` on the G global views and student scores `s_v` on
all V views (`[batch, K]` each), a center `c: [K]` and temperatures `tau_t(step)`, `tau_s`:

  q_g = softmax((t_g - c) / tau_t)                    (no gradient)
  loss = mean_{g, v != g} mean_batch sum_k -q_g[k] * log softmax(s_v / tau_s)[k]
  c <- m * c + (1 - m) * mean_{g, batch} t_g           (m = dino_center_momentum = 0.9)

`tau_t` warms up linearly from `dino_warmup_teacher_temp` (0.04) to `dino_teacher_temp`
(0.07) over `dino_warmup_teacher_temp_steps`, then stays; `tau_s = dino_student_temp` (0.1).
The center is updated with the mean over the global batch: inside `jax.jit` on a mesh the
mean of a batch-sharded array is reduced across devices, as DINO's all-reduce does.
"""
import jax
import jax.numpy as jnp
import ml_collections

from bits_jax.models import heads

NAME = "dino"


def make_head(config: ml_collections.ConfigDict):
  """3-layer MLP -> bottleneck -> L2 norm -> weight-normalized `dino_out_dim` prototypes."""
  return heads.DinoHead(
      out_dim=config.dino_out_dim,
      hidden_dim=config.head_hidden_dim,
      bottleneck_dim=config.head_bottleneck_dim,
      num_layers=config.head_layers,
      norm_last_layer=config.dino_norm_last_layer,
      dtype=config.get("dtype", "float32"))


def init_state(config: ml_collections.ConfigDict):
  """The center of the teacher scores, `{'center': [out_dim]}` zeros."""
  return {"center": jnp.zeros((config.dino_out_dim,), jnp.float32)}


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Impossible DINO settings, each with its fix (called by config validation)."""
  problems = []
  for key in ("dino_student_temp", "dino_teacher_temp", "dino_warmup_teacher_temp"):
    if not config[key] > 0:
      problems.append(f"config.{key}={config[key]} must be > 0 (DINO: student 0.1, teacher "
                      f"0.04 -> 0.07).")
  if not 0 <= config.dino_center_momentum < 1:
    problems.append(f"config.dino_center_momentum={config.dino_center_momentum} must be in "
                    f"[0, 1) (DINO: 0.9).")
  if config.dino_out_dim < 1:
    problems.append(f"config.dino_out_dim={config.dino_out_dim} must be >= 1 (DINO: 65536).")
  return problems


def teacher_temperature(step, config: ml_collections.ConfigDict) -> jax.Array:
  """Linear warm-up from `dino_warmup_teacher_temp` to `dino_teacher_temp`, then constant."""
  start, end = config.dino_warmup_teacher_temp, config.dino_teacher_temp
  warmup = config.dino_warmup_teacher_temp_steps
  if warmup <= 0:
    return jnp.asarray(end, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)
  return start + (end - start) * frac


def cross_view_pairs(num_teacher_views: int, num_student_views: int):
  """(teacher view g, student view v) index pairs with v != g."""
  return [(g, v) for g in range(num_teacher_views)
          for v in range(num_student_views) if v != g]


def teacher_probs(teacher_out: jax.Array, center: jax.Array, temperature) -> jax.Array:
  """Centered, sharpened teacher softmax, no gradient. `[G, batch, K] -> [G, batch, K]`."""
  logits = (teacher_out.astype(jnp.float32) - center) / temperature
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def updated_center(center: jax.Array, teacher_out: jax.Array, momentum: float) -> jax.Array:
  """EMA of the mean teacher score over views and the (global) batch. `center: [K]`."""
  batch_center = jnp.mean(teacher_out.astype(jnp.float32), axis=(0, 1))
  return jax.lax.stop_gradient(center * momentum + batch_center * (1.0 - momentum))


def loss(student_out: jax.Array, teacher_out: jax.Array, state, *, step,
         config: ml_collections.ConfigDict):
  """DINO objective.

  Args:
    student_out: [V, batch, K] prototype scores for all views (G global first).
    teacher_out: [G, batch, K] for the global views.
    state: {'center': [K]}.
    step: the global step (drives the teacher temperature warm-up).
    config: `dino_*` keys.
  Returns:
    (loss, (new_state, metrics)).
  """
  pairs = cross_view_pairs(teacher_out.shape[0], student_out.shape[0])
  if not pairs:
    raise ValueError("DINO needs at least two views (two global crops, or one global crop "
                     "and one local crop): set num_global_crops=2 or num_local_crops>0.")
  temp = teacher_temperature(step, config)
  q = teacher_probs(teacher_out, state["center"], temp)
  log_p = jax.nn.log_softmax(student_out.astype(jnp.float32) / config.dino_student_temp,
                             axis=-1)
  terms, agree = [], []
  for g, v in pairs:
    terms.append(jnp.mean(-jnp.sum(q[g] * log_p[v], axis=-1)))
    agree.append(jnp.mean((jnp.argmax(q[g], -1) == jnp.argmax(log_p[v], -1))
                          .astype(jnp.float32)))
  total = jnp.mean(jnp.stack(terms))
  new_state = {"center": updated_center(state["center"], teacher_out,
                                        config.dino_center_momentum)}
  teacher_entropy = jnp.mean(-jnp.sum(q * jnp.log(jnp.clip(q, 1e-30)), axis=-1))
  mean_q = jnp.mean(q, axis=(0, 1))
  metrics = {
      "loss": total,
      "teacher_temperature": temp,
      "teacher_entropy": teacher_entropy,
      # Entropy of the batch-mean teacher distribution: low means collapse to few prototypes.
      "teacher_marginal_entropy": -jnp.sum(mean_q * jnp.log(jnp.clip(mean_q, 1e-30))),
      "agreement_accuracy": jnp.mean(jnp.stack(agree)),
  }
  return total, (new_state, metrics)
