"""Tests for the MLP probe and the 'linear' evaluator in bits_jax.evaluate.linear."""

import types

import numpy as np
import pytest

from bits_jax.evaluate import linear


def _xor_data(rng, n):
  """Two classes by the sign of x0 * x1: not linearly separable, easy for an MLP."""
  x = rng.normal(size=(n, 4)).astype(np.float32)
  x = x[np.abs(x[:, 0] * x[:, 1]) > 0.3][: n // 2]
  return x, (x[:, 0] * x[:, 1] > 0).astype(np.int32)


def test_mlp_probe_solves_xor_where_linear_cannot():
  rng = np.random.default_rng(0)
  x, y = _xor_data(rng, 1600)
  split = len(x) * 3 // 4
  args = (x[:split], y[:split], x[split:], y[split:])
  kwargs = dict(num_classes=2, epochs=60, batch_size=64, optimizer="adamw")
  lin = linear.linear_probe(*args, learning_rates=(0.01,), **kwargs)
  mlp = linear.mlp_probe(*args, hidden_dim=32, learning_rates=(0.003, 0.01), **kwargs)
  assert lin["linear_top1"] < 0.7
  assert mlp["mlp_top1"] > 0.9
  assert set(mlp) == {
      "mlp_top1",
      "mlp_best_lr",
      "mlp_val_top1",
      "mlp_val_top1_lr0.003",
      "mlp_val_top1_lr0.01",
  }
  with pytest.raises(ValueError, match="hidden_dim"):
    linear.mlp_probe(*args, hidden_dim=0, **kwargs)


def test_run_with_fake_context():
  rng = np.random.default_rng(1)

  def split(n):
    labels = rng.integers(0, 5, size=n)
    cls = rng.normal(size=(n, 6)).astype(np.float32) + 3 * np.eye(5, 6)[labels]
    mask = np.ones(n, bool)
    mask[-3:] = False
    # cls_last4 of the same width reuses the compiled probes (a fast test).
    return {"cls": cls, "cls_last4": cls[:, ::-1].copy(), "label": labels, "mask": mask}

  data = {"train": split(300), "test": split(100)}
  ctx = types.SimpleNamespace(
      features=data.__getitem__, out_dir=None, add_plot=None, mesh=None, step=0, num_classes=5
  )
  got = linear.run(
      ctx,
      epochs=10,
      mlp=True,
      last4=True,
      hidden_dim=16,
      batch_size=64,
      learning_rates=(0.1,),
      mlp_learning_rates=(0.03,),
  )
  for prefix in ("", "last4/"):
    assert got[prefix + "linear_top1"] > 0.8
    assert got[prefix + "mlp_top1"] > 0.8
    assert prefix + "mlp_top5" in got
  data["train"]["label"] = np.eye(5, dtype=bool)[data["train"]["label"]]
  with pytest.raises(ValueError, match="multi-hot"):
    linear.run(ctx)
