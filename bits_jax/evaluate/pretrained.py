"""Moved: weights loading is `bits_jax.weights`, adaptation `bits_jax.models.adapt`.

Kept as aliases until every caller imports those modules directly.
"""
from bits_jax import weights
from bits_jax.models import adapt

resolve_checkpoint = weights.resolve_checkpoint
load_params = weights.load_params
adapt_params = adapt.adapt_params
