"""Experiment configs: `get_config(arg)` in each module (ml_collections config files)."""
