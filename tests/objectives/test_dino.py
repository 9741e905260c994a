"""DINO loss, head, temperature schedule, center update and last-layer freezing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bits_jax import train_state
from bits_jax import train_step
from bits_jax.models import heads
from bits_jax.objectives import dino
import helpers


def _config(**overrides):
  """`config.objective.dino` is all the loss reads."""
  settings = dict(
      out_dim=16,
      student_temp=0.1,
      teacher_temp=0.07,
      warmup_teacher_temp=0.04,
      warmup_teacher_temp_steps=100,
      center_momentum=0.9,
  )
  settings.update(overrides)
  return ml_collections.ConfigDict(dict(objective=dict(dino=settings)))


def numpy_dino(student, teacher, center, step, config):
  """The published DINO loss (Caron et al. 2021, Algorithm 1 + multi-crop), in float64."""
  config = config.objective.dino
  student, teacher = np.float64(student), np.float64(teacher)
  warm = config.warmup_teacher_temp_steps
  t_temp = config.warmup_teacher_temp + min(step / warm, 1.0) * (
      config.teacher_temp - config.warmup_teacher_temp
  )

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  total, n_terms = 0.0, 0
  for g in range(teacher.shape[0]):
    q = softmax((teacher[g] - center) / t_temp)
    for v in range(student.shape[0]):
      if v == g:
        continue
      log_p = np.log(softmax(student[v] / config.student_temp))
      total += np.mean(np.sum(-q * log_p, axis=-1))
      n_terms += 1
  m = config.center_momentum
  new_center = center * m + (1 - m) * teacher.reshape(-1, teacher.shape[-1]).mean(0)
  return total / n_terms, new_center


@pytest.mark.parametrize("step", [0, 37, 100, 250])
def test_loss_and_center_match_numpy(step):
  rng = np.random.RandomState(step)
  student = rng.randn(6, 8, 16).astype(np.float32)  # 2 global + 4 local views
  teacher = rng.randn(2, 8, 16).astype(np.float32)
  center = 0.3 * rng.randn(16).astype(np.float32)
  config = _config()
  loss, (state, metrics) = dino.loss(
      jnp.asarray(student),
      jnp.asarray(teacher),
      {"center": jnp.asarray(center)},
      step=step,
      config=config,
  )
  ref_loss, ref_center = numpy_dino(student, teacher, center, step, config)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(state["center"], ref_center, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      metrics["teacher_temperature"], 0.04 + 0.03 * min(step / 100, 1.0), rtol=1e-6
  )


def test_teacher_temperature_schedule():
  config = _config()
  temps = [float(dino.teacher_temperature(s, config)) for s in (0, 50, 100, 1000)]
  np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
  config.objective.dino.warmup_teacher_temp_steps = 0
  assert float(dino.teacher_temperature(0, config)) == pytest.approx(0.07)


def test_no_gradient_to_teacher_or_center():
  rng = np.random.RandomState(0)
  s = jnp.asarray(rng.randn(3, 4, 16).astype(np.float32))
  t = jnp.asarray(rng.randn(2, 4, 16).astype(np.float32))
  c = jnp.asarray(rng.randn(16).astype(np.float32))
  f = lambda s, t, c: dino.loss(s, t, {"center": c}, step=5, config=_config())[0]
  gs, gt, gc = jax.grad(f, argnums=(0, 1, 2))(s, t, c)
  assert np.abs(gs).sum() > 0
  np.testing.assert_array_equal(gt, 0.0)
  np.testing.assert_array_equal(gc, 0.0)


def test_center_uses_global_batch_on_8_devices():
  rng = np.random.RandomState(1)
  student = rng.randn(4, 16, 16).astype(np.float32)
  teacher = rng.randn(2, 16, 16).astype(np.float32)
  teacher[:, :8] += 3.0  # shards differ, so a per-device center would be wrong
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = NamedSharding(mesh, P(None, "data"))
  fn = jax.jit(lambda s, t, c: dino.loss(s, t, {"center": c}, step=10, config=_config()))
  loss, (state, _) = fn(
      jax.device_put(student, sharded), jax.device_put(teacher, sharded), jnp.zeros(16)
  )
  ref_loss, ref_center = numpy_dino(student, teacher, np.zeros(16), 10, _config())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(state["center"], ref_center, rtol=1e-5, atol=1e-7)


def test_single_view_is_a_clear_error():
  with pytest.raises(ValueError, match="at least two views"):
    dino.loss(
        jnp.zeros((1, 2, 16)),
        jnp.zeros((1, 2, 16)),
        {"center": jnp.zeros(16)},
        step=0,
        config=_config(),
    )


def test_head_normalized_bottleneck_and_unit_prototypes():
  head = heads.DinoHead(out_dim=32, hidden_dim=16, bottleneck_dim=8, num_layers=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 12))
  params = head.init(jax.random.PRNGKey(1), x)["params"]
  assert set(params) == {"mlp", "last_layer"}
  assert set(params["last_layer"]) == {"kernel_v"}  # norm_last_layer: no learned scale
  out = head.apply({"params": params}, x)
  assert out.shape == (5, 32) and out.dtype == jnp.float32
  # Unit bottleneck times unit prototypes: cosine similarities.
  assert np.all(np.abs(out) <= 1 + 1e-5)
  # Weight normalization: rescaling a prototype's direction vector changes nothing.
  scaled = jax.tree_util.tree_map(lambda x: x, params)
  scaled["last_layer"]["kernel_v"] = params["last_layer"]["kernel_v"] * jnp.arange(1, 33)
  np.testing.assert_allclose(head.apply({"params": scaled}, x), out, rtol=1e-5, atol=1e-6)
  free = heads.DinoHead(out_dim=32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
  assert "scale_g" in free.init(jax.random.PRNGKey(1), x)["params"]["last_layer"]


@pytest.fixture(scope="module")
def config():
  config = helpers.load_config("fashion_mnist", "test,dino")
  config.objective.dino.freeze_last_layer_steps = 2
  return config


def test_preset(config):
  components = train_state.build(config)
  assert config.objective.name == "dino" and components.head_reset_every == 0
  state = jax.eval_shape(lambda: train_state.create(components, config, jax.random.PRNGKey(0)))
  assert state.objective_state["center"].shape == (config.objective.dino.out_dim,)


def test_last_layer_frozen_for_first_steps(config):
  components, state = helpers.create_state(config)
  step = jax.jit(train_step.make_train_step(components, config))
  history = [state]
  for i in range(3):
    state, metrics = step(state, helpers.random_batch(config, seed=i))
    assert float(metrics["update_skipped"]) == 0.0
    history.append(state)
  last = lambda s: np.asarray(s.params["head"]["last_layer"]["kernel_v"])
  mlp = lambda s: np.asarray(s.params["head"]["mlp"]["bottleneck"]["kernel"])
  # Step 0 has learning rate 0 (warm-up). Step 1 (< freeze_last_layer_steps=2) trains the
  # rest of the head but not the last layer; step 2 trains it too.
  assert not np.allclose(mlp(history[2]), mlp(history[1]))
  np.testing.assert_array_equal(last(history[2]), last(history[0]))
  assert not np.allclose(last(history[3]), last(history[2]))
  # The center moved away from zero with the teacher's outputs.
  assert np.abs(np.asarray(history[1].objective_state["center"])).sum() > 0


def _adam_counts(opt_state) -> dict[str, int]:
  """{group: Adam's bias-correction count} of the optimizer's parameter groups."""
  counts = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if keys[-1] == "count":
      group = next(k for k in keys if k in ("backbone", "head", "frozen"))
      counts[group] = int(leaf)
  return counts


def test_prototypes_start_adam_afresh_after_the_freeze(config):
  """PyTorch's AdamW leaves a parameter without gradient untouched: after the freeze, the
  prototypes' first update is Adam's first step (each weight moves by ~lr), not one with a
  spent bias correction and near-zero moments."""
  components, state = helpers.create_state(config)
  assert components.frozen == dino.frozen_params(config)
  step = jax.jit(train_step.make_train_step(components, config))
  counts = []
  for i in range(3):
    before = state
    state, _ = step(state, helpers.random_batch(config, seed=i))
    counts.append(_adam_counts(state.opt_state))
  # Frozen for steps 0 and 1: its count stays 0 while the rest of the head's runs on.
  assert [c["frozen"] for c in counts] == [0, 0, 1]
  assert [c["head"] for c in counts] == [1, 2, 3]
  kernel = lambda s: np.asarray(s.params["head"]["last_layer"]["kernel_v"], np.float64)
  moved = np.abs(kernel(state) - kernel(before))
  lr = float(components.schedules.learning_rate(2))
  # Adam's first step: lr * g / (|g| + eps) per weight (+ a small decoupled weight decay);
  # with the head's shared count (3) it would be ~0.64 lr.
  assert lr > 0 and np.median(moved) == pytest.approx(lr, rel=0.02)


def test_head_reset_also_resets_the_frozen_group(config):
  config = config.copy_and_resolve_references()
  config.objective.head.reset_every_steps = 3
  components, state = helpers.create_state(config)
  step = jax.jit(train_step.make_train_step(components, config))
  for i in range(4):  # the reset runs at the start of step 3
    state, _ = step(state, helpers.random_batch(config, seed=i))
  assert _adam_counts(state.opt_state) == {"backbone": 4, "head": 1, "frozen": 1}


def test_config_problems_name_the_fix():
  assert dino.config_problems(_config(out_dim=8)) == []
  problems = dino.config_problems(_config(student_temp=0.0, center_momentum=1.0))
  assert len(problems) == 2
  assert "config.objective.dino.student_temp=0.0 must be > 0" in problems[0]
