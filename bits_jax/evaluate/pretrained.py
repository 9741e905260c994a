"""Moved to `bits_jax.weights` (adaptation: `bits_jax.models.adapt`).

Kept as aliases until every caller imports those modules directly.
"""

from bits_jax import weights

resolve_checkpoint = weights.resolve_checkpoint
load_params = weights.load_params
adapt_params = weights.adapt_params
