"""Command-line tools around training: weight conversion (`python -m bits_jax.tools.convert`)."""
