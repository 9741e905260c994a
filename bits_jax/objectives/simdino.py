"""SimDINO (Wu et al., 2025, "Simplifying DINO via Coding Rate Regularization").

The student's projections are pulled towards the teacher's in Euclidean distance on the unit
sphere, and a coding-rate term on the global views' projections prevents collapse (no
centering, sharpening, prototypes or temperatures). With `z = x / ||x||`, student
projections `zs_v` on all V views, teacher projections `zt_g` on the G global views
(`[n, d]` each, n the global batch):

  loss = mean_{g, v != g} mean_batch 1/2 ||zs_v - zt_g||^2  -  gamma * mean_g R_eps(w_g)
  R_eps(W) = 1/2 logdet(I_d + d / (n * eps) * W^T W)     (`coding_rate.global_view_rate`)
  gamma = coding_rate_weight * (d + n) / (d * n)      (config.objective.simdino)

As the SimDINO reference code runs by default (`config.objective.simdino`): w_g = (zs_g +
zt_g) / 2, the teacher's without gradient (`rate_views='student_teacher'`, its
expa_type=1; 'student': w_g = zs_g), and one Gram matrix per device, the rates averaged with
the global n kept in d / (n eps) (`rate_scope='device'`, its reduce_cov=0; 'global': one
over the global batch). `gamma`'s factor (d + n) / (d n) is its balancing weight and eps = 0.5
its default. On the sphere 1/2 ||a - b||^2 = 1 - cos(a, b), so this equals the reference's
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
  return common.positive(config, "simdino", ("eps",), "SimDINO: 0.5") + common.one_of(
      config,
      "simdino",
      dict(rate_views=coding_rate_lib.RATE_VIEWS, rate_scope=coding_rate_lib.RATE_SCOPES),
  )


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
    config: reads `config.objective.simdino` (eps, coding_rate_weight, rate_views,
      rate_scope).
    batch_shards: the devices the batch is split over (for rate_scope='device').
  Returns:
    (loss, (new_state, metrics)); metrics[common.LOSS_TERMS]: {'distance', 'coding_rate'}.
  """
  del step
  simdino = config.objective.simdino
  pairs = common.cross_view_pairs(teacher_out.shape[0], student_out.shape[0], "SimDINO")
  zs = utils.l2_normalize(student_out.astype(jnp.float32))
  zt = jax.lax.stop_gradient(utils.l2_normalize(teacher_out.astype(jnp.float32)))
  distance = common.mean_over_pairs(
      lambda g, v: jnp.mean(0.5 * jnp.sum((zs[v] - zt[g]) ** 2, axis=-1)), pairs
  )
  rate = coding_rate_lib.global_view_rate(
      student_out,
      teacher_out,
      simdino.eps,
      views=simdino.rate_views,
      scope=simdino.rate_scope,
      batch_shards=batch_shards,
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
