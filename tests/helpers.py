"""Shared test utilities."""
import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = ""):
  """`get_config(arg)` of configs/<name>.py."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def random_batch(config, seed: int = 0):
  """A synthetic multi-crop batch with the pipeline's structure."""
  rng = np.random.RandomState(seed)
  b, c = config.batch_size, config.num_channels
  batch = {"global": rng.randn(b, config.num_global_crops, config.global_crop_size,
                               config.global_crop_size, c).astype(np.float32)}
  if config.num_local_crops:
    batch["local"] = rng.randn(b, config.num_local_crops, config.local_crop_size,
                               config.local_crop_size, c).astype(np.float32)
  return batch
