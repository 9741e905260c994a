"""ResNet backbone: shapes, cross-device BatchNorm statistics, train/eval modes, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bits_jax import models
from bits_jax import sharding as sharding_lib
from bits_jax import train
from bits_jax import train_state
from bits_jax import train_step
from bits_jax.evaluate import common as evaluate_common
from bits_jax.models import resnet
import helpers


def _tiny(name="resnet18", small_stem=True):
  block, stages = resnet.RESNET_SIZES[name]
  return resnet.ResNet(block=block, stage_sizes=stages, width=8, small_stem=small_stem)


@pytest.mark.parametrize(
    "name,small_stem,size,grid,width",
    [("resnet18", True, 28, 4, 64), ("resnet50", False, 64, 2, 256)],
)
def test_shapes(name, small_stem, size, grid, width):
  model = _tiny(name, small_stem)
  x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert model.feature_dim == width  # width * 2**3 stages (* 4 for bottleneck blocks)
  assert out["cls"].shape == (2, width)
  assert out["patch_tokens"].shape == (2, grid * grid, width)
  assert set(variables) == {"params", "batch_stats"}


def _train_mode_apply(model, variables, x):
  return model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_batchnorm_statistics_8_devices_equal_1_device(assert_trees_close):
  """Under jit with a batch-sharded input, BatchNorm reduces over the global batch."""
  model = _tiny()
  x = np.random.RandomState(0).randn(16, 12, 12, 3).astype(np.float32) * 2 + 1
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  results = []
  for n in (1, 8):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    out, updated = jax.jit(functools.partial(_train_mode_apply, model))(vs, xs)
    results.append(jax.device_get((out, updated["batch_stats"])))
  (out1, stats1), (out8, stats8) = results
  # Per-device statistics would be off by ~1e-1; the sums' order differs by ~1e-5.
  assert_trees_close(out1, out8, rtol=1e-4, atol=1e-4)
  assert_trees_close(stats1, stats8, rtol=1e-5, atol=1e-6)
  # The running mean of the stem BatchNorm moved towards the global batch mean of conv1.
  conv1 = jax.lax.conv_general_dilated(
      x,
      variables["params"]["conv1"]["kernel"],
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(
      stats1["bn1"]["mean"], 0.1 * np.asarray(conv1).mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  # A per-device statistic would differ: the shards have different means.
  shard_mean = 0.1 * np.asarray(conv1)[:2].mean((0, 1, 2))
  assert not np.allclose(stats8["bn1"]["mean"], shard_mean, atol=1e-4)


def test_eval_mode_uses_running_averages():
  model = _tiny()
  x = np.random.RandomState(1).randn(8, 12, 12, 3).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  _, updated = _train_mode_apply(model, variables, x)
  moved = dict(variables, batch_stats=updated["batch_stats"])
  a = model.apply(variables, x, train=False)["cls"]
  b = model.apply(moved, x, train=False)["cls"]
  assert not np.allclose(a, b)
  # Eval mode is per-example: one image's features do not depend on the rest of the batch.
  np.testing.assert_allclose(model.apply(moved, x[:1], train=False)["cls"], b[:1], atol=1e-5)


@pytest.fixture(scope="module")
def config():
  config = helpers.load_config("fashion_mnist", "test")
  config.model = dict(name="resnet18", width=8, small_stem=True)
  return config


def test_build_backbone_and_width(config):
  assert isinstance(models.build_backbone(config), resnet.ResNet)
  assert models.feature_dim(config) == 64
  bad = config.copy_and_resolve_references()
  bad.model.name = "resnet34"
  with pytest.raises(ValueError, match="config.model.name='resnet34'.*'resnet18', 'resnet50'"):
    models.build_backbone(bad)


@pytest.fixture(scope="module")
def trained(config):
  """(components, initial state, state after 2 jitted train steps on one device)."""
  components, init = helpers.create_state(config)
  step = jax.jit(train_step.make_train_step(components, config))
  state = init
  for seed in range(2):
    state, metrics = step(state, helpers.random_batch(config, seed=seed))
    assert float(metrics["update_skipped"]) == 0.0
  return components, init, jax.device_get(state)


def test_train_step_updates_student_and_teacher_batch_stats(trained):
  # Cross-device equality of the statistics is test_batchnorm_statistics_8_devices_...;
  # here: the step threads them through and the teacher keeps its own.
  _, init, state = trained
  for stats in ("batch_stats", "teacher_batch_stats"):
    moved = jax.tree_util.tree_map(
        lambda a, b: float(np.abs(a - b).max()), getattr(init, stats), getattr(state, stats)
    )
    assert min(jax.tree_util.tree_leaves(moved)) > 0, stats
  # The teacher's running averages come from its own forward pass on the global crops,
  # the student's from its passes on global and local crops: they differ.
  assert not np.allclose(
      state.batch_stats["backbone"]["bn1"]["mean"],
      state.teacher_batch_stats["backbone"]["bn1"]["mean"],
  )


def test_eval_features_use_teacher_running_averages(config, trained):
  """The evaluators' features (train loop and CLI) come from the teacher in eval mode."""
  components, _, state = trained
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  images = helpers.random_batch(config)["global"][:, 0]
  ctx = evaluate_common.EvalContext(config, components, train.teacher_variables(state), mesh)
  feats = ctx.predict(images)
  expected = models.build_backbone(config).apply(
      train_state.backbone_variables(state.teacher_params, state.teacher_batch_stats),
      images,
      train=False,
  )["cls"]
  np.testing.assert_allclose(feats["cls"], expected, rtol=1e-5, atol=1e-5)
