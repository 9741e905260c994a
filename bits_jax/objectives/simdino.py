"""SimDINO (Wu et al., 2025, "Simplifying DINO via Coding Rate Regularization").

The student's projections are pulled towards the teacher's in Euclidean distance on the unit
sphere, and a coding-rate term on the student's global-view projections prevents collapse
(no centering, sharpening, prototypes or temperatures). With `z = x / ||x||`, student
projections `zs_v` on all V views, teacher projections `zt_g` on the G global views
(`[n, d]` each, n the global batch):

  loss = mean_{g, v != g} mean_batch 1/2 ||zs_v - zt_g||^2  -  gamma * mean_g R_eps(zs_g)
  R_eps(Z) = 1/2 logdet(I_d + d / (n * eps) * Z^T Z)       (`coding_rate.coding_rate`)
  gamma = coding_rate_weight * (d + n) / (d * n)      (config.objective.simdino)

`gamma`'s factor (d + n) / (d n) is the balancing weight of the SimDINO reference
implementation, and `eps` enters as d / (n eps) there too (default `eps = 0.5`, its
default). On the sphere 1/2 ||a - b||^2 = 1 - cos(a, b), so this equals the reference's
"-cosine - expansion" loss up to the constant 1.
"""

import jax
import jax.numpy as jnp
import ml_collections

from bits_jax import utils
from bits_jax.models import heads
from bits_jax.objectives import coding_rate as coding_rate_lib
from bits_jax.objectives import common


def make_head(config: ml_collections.ConfigDict):
  """3-layer MLP to `objective.head.bottleneck_dim` (0: 256), normalized in the loss."""
  head = config.objective.head
  return heads.SimDinoHead(
      dim=head.bottleneck_dim or heads.DEFAULT_BOTTLENECK,
      hidden_dim=head.hidden_dim,
      num_layers=head.num_layers,
      dtype=config.get("dtype", "float32"),
  )


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Impossible SimDINO settings, each with its fix (called by config validation)."""
  return common.positive(config, "simdino", ("eps",), "SimDINO: 0.5")


def loss(
    student_out: jax.Array,
    teacher_out: jax.Array,
    state,
    *,
    step,
    config: ml_collections.ConfigDict,
    batch_shards: int = 1,
):
  """SimDINO objective.

  Args:
    student_out: [V, batch, d] projections for all views (G global first).
    teacher_out: [G, batch, d] for the global views.
    state: objective state (empty).
    step: the global step (unused).
    config: reads `config.objective.simdino` (eps, coding_rate_weight).
    batch_shards: unused (the coding rate is over the global batch).
  Returns:
    (loss, (new_state, metrics)); metrics[common.LOSS_TERMS]: {'distance', 'coding_rate'}.
  """
  del step, batch_shards
  simdino = config.objective.simdino
  pairs = common.cross_view_pairs(teacher_out.shape[0], student_out.shape[0], "SimDINO")
  zs = utils.l2_normalize(student_out.astype(jnp.float32))
  zt = jax.lax.stop_gradient(utils.l2_normalize(teacher_out.astype(jnp.float32)))
  distance = common.mean_over_pairs(
      lambda g, v: jnp.mean(0.5 * jnp.sum((zs[v] - zt[g]) ** 2, axis=-1)), pairs
  )
  num_global = teacher_out.shape[0]
  rate = jnp.mean(
      jnp.stack(
          [coding_rate_lib.coding_rate(student_out[g], simdino.eps) for g in range(num_global)]
      )
  )
  n, d = student_out.shape[1], student_out.shape[2]
  gamma = simdino.coding_rate_weight * common.coding_rate_balance(n, d)
  total = distance - gamma * rate
  metrics = {
      common.LOSS_TERMS: {"distance": distance, "coding_rate": -gamma * rate},
      "loss": total,
      "distance": distance,
      "cosine_similarity": 1.0 - distance,
      "coding_rate": rate,
  }
  return total, (state, metrics)


OBJECTIVE = common.Objective(
    name="simdino", make_head=make_head, loss=loss, config_problems=config_problems
)
