"""Scale-out on 8 fake CPU devices: mesh, partition rules, FSDP/data parallel equivalence,
global-batch coding rate, gradient accumulation, bf16, remat and donation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bits_jax import sharding as sharding_lib
from bits_jax import train_state
from bits_jax import train_step
from bits_jax import utils
from bits_jax.objectives import coding_rate as coding_rate_lib
from tests import helpers


@pytest.fixture(scope="module")
def config():
  config = helpers.load_config("fashion_mnist", "test")
  config.input.batch_size = 16
  config.fsdp_min_size = 256  # shard the tiny test model's kernels too
  return config


def _with(config, **overrides):
  """A copy of `config` with overrides; `a__b=v` sets the nested key `config.a.b`."""
  new = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *sections, name = key.split("__")
    section = new
    for part in sections:
      section = section[part]
    section[name] = value
  return new


def _state_shardings(config, mesh):
  components = train_state.build(config)
  return sharding_lib.shardings_of(sharding_lib.abstract_state(components, config, mesh))


def _run(config, devices, batches):
  """(host state, host metrics list) after one step per batch on `config.mesh` over devices."""
  mesh = sharding_lib.make_mesh(config, devices)
  components, state = helpers.create_state(config, mesh)  # config.seed = 0
  state_sharding = sharding_lib.shardings_of(state)
  step = train_step.compile_train_step(components, config, mesh, state_sharding)
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return state, jax.device_get(state), metrics


def _assert_trees_close(a, b, tol=1e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.fixture(scope="module")
def batches(config):
  return [helpers.random_batch(config, seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def single_device_run(config, batches):
  _, host, metrics = _run(config, jax.devices()[:1], batches)
  return host, metrics


# ------------------------------------------------------------------------------ mesh


def test_mesh_from_config():
  assert sharding_lib.mesh_shape({"data": -1, "fsdp": 1}, 8) == (8, 1)
  assert sharding_lib.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
  assert sharding_lib.mesh_shape({"fsdp": 8}, 8) == (1, 8)
  assert sharding_lib.mesh_shape(None, 4) == (4, 1)
  config = helpers.load_config("fashion_mnist", "test")
  config.mesh = {"data": 2, "fsdp": 4}
  mesh = sharding_lib.make_mesh(config)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding_lib.batch_sharding(mesh).spec == P(("data", "fsdp"))


@pytest.mark.parametrize(
    "mesh, match",
    [
        ({"data": 3, "fsdp": 2}, "needs 6 devices but 8"),
        ({"data": -1, "fsdp": 3}, "not divisible by 3"),
        ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
        ({"data": 8, "model": 1}, "unknown axes.*'model'"),
    ],
)
def test_bad_mesh_config(mesh, match):
  with pytest.raises(ValueError, match=match):
    sharding_lib.mesh_shape(mesh, 8)


def test_micro_batch_divisibility():
  mesh = sharding_lib.make_mesh(None, jax.devices()[:8])
  sharding_lib.check_batch_divisible(64, mesh, micro_batches=4)
  with pytest.raises(ValueError, match="micro-batch.*not divisible by the 8 devices"):
    sharding_lib.check_batch_divisible(32, mesh, micro_batches=8)
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps=3"):
    sharding_lib.check_batch_divisible(64, mesh, micro_batches=3)


# --------------------------------------------------------------------- partition rules


def test_fsdp_rules_shard_params_teacher_and_moments_alike(config):
  cfg = _with(config, mesh={"data": 2, "fsdp": 4})
  mesh = sharding_lib.make_mesh(cfg)
  shardings = _state_shardings(cfg, mesh)
  flat = {utils.path_name(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  kernel = "backbone/block0/mlp/fc1/kernel"  # [32, 128]: largest dim split
  assert flat[f"params/{kernel}"] == P(None, "fsdp")
  assert flat[f"teacher_params/{kernel}"] == P(None, "fsdp")
  moments = [
      spec for name, spec in flat.items() if name.startswith("opt_state") and name.endswith(kernel)
  ]
  assert len(moments) == 2 and all(spec == P(None, "fsdp") for spec in moments)
  assert flat["params/backbone/block0/mlp/fc1/bias"] == P()  # 128 < fsdp_min_size
  assert flat["step"] == P() and flat["rng"] == P()
  sharded = [name for name, spec in flat.items() if spec != P()]
  assert len(sharded) > 20

  # Pure data parallel: with fsdp=1 (or a 'replicated' rule) everything is replicated.
  data_mesh = sharding_lib.make_mesh(_with(cfg, mesh={"data": -1, "fsdp": 1}))
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(_state_shardings(cfg, data_mesh)))
  repl = _with(cfg, partition_rules=((".*", "replicated"),))
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(_state_shardings(repl, mesh)))


def test_explicit_partition_rules(config):
  mesh = sharding_lib.make_mesh(_with(config, mesh={"data": 2, "fsdp": 4}))
  rules = _with(
      config,
      partition_rules=(
          ("pos_embed$", "replicated"),
          ("mlp/fc1/kernel$", ("fsdp", None)),
          (".*", "fsdp"),
      ),
  )
  spec = lambda name, shape: sharding_lib.partition_spec(name, shape, mesh, rules)
  assert spec("params/backbone/pos_embed", (1, 16, 32)) == P()
  assert spec("opt_state/0/mu/backbone/block0/mlp/fc1/kernel", (32, 128)) == P("fsdp", None)
  assert spec("params/backbone/block0/mlp/fc2/kernel", (128, 32)) == P("fsdp", None)
  with pytest.raises(ValueError, match="splits a dimension of size 30"):
    spec("params/backbone/block0/mlp/fc1/kernel", (30, 128))
  bad = _with(config, partition_rules=((".*", "sharded"),))
  with pytest.raises(ValueError, match="use 'replicated', 'fsdp'"):
    sharding_lib.partition_spec("params/x", (8, 8), mesh, bad)


# --------------------------------------------------------------- sharding equivalence


@pytest.mark.parametrize(
    "mesh", [{"data": 2, "fsdp": 4}, {"data": 8, "fsdp": 1}], ids=["fsdp_2x4", "data_8"]
)
def test_mesh_matches_single_device(config, batches, single_device_run, mesh):
  cfg = _with(config, mesh=mesh)
  state, host, metrics = _run(cfg, jax.devices()[:8], batches)
  ref_host, ref_metrics = single_device_run
  for a, b in zip(ref_metrics, metrics):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["coding_rate"], b["coding_rate"], rtol=1e-5, atol=1e-5)
  _assert_trees_close(ref_host.params, host.params)
  _assert_trees_close(ref_host.teacher_params, host.teacher_params)
  # The state stays laid out as the rules say (FSDP kernels split over 4 devices).
  fc1 = state.params["backbone"]["block0"]["mlp"]["fc1"]["kernel"]
  expected = P(None, "fsdp") if mesh["fsdp"] == 4 else P()
  assert fc1.sharding.spec == expected
  if mesh["fsdp"] == 4:
    assert fc1.addressable_shards[0].data.shape == (32, 32)


def test_coding_rate_uses_the_global_batch():
  """Under jit on a sharded batch the coding rate equals the full-batch value, not a mean
  of per-device coding rates."""
  z = np.random.RandomState(0).randn(64, 16).astype(np.float32)
  mesh = sharding_lib.make_mesh(None, jax.devices()[:8])
  z_sharded = jax.device_put(z, sharding_lib.batch_sharding(mesh))
  assert len(z_sharded.sharding.device_set) == 8
  sharded = jax.jit(lambda x: coding_rate_lib.coding_rate(x, 0.05))(z_sharded)
  full = coding_rate_lib.coding_rate(jnp.asarray(z), 0.05)
  per_device = np.mean(
      [coding_rate_lib.coding_rate(jnp.asarray(part), 0.05) for part in np.split(z, 8)]
  )
  np.testing.assert_allclose(sharded, full, rtol=1e-5)
  assert abs(float(full) - per_device) > 1.0


# -------------------------------------------------------------------- accumulation


def test_split_micro_batches_is_strided():
  batch = {"global": np.arange(12).reshape(12, 1)}
  micro = train_step.split_micro_batches(batch, 3)["global"]
  assert micro.shape == (3, 4, 1)
  np.testing.assert_array_equal(micro[1, :, 0], [1, 4, 7, 10])
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps=5"):
    train_step.split_micro_batches(batch, 5)


def test_grad_accumulation_matches_big_batch_bce_only(config, batches):
  bce_only = _with(config, objective__bits__coding_rate_weight=0.0, mesh={"data": 2, "fsdp": 4})
  _, big, big_metrics = _run(bce_only, jax.devices()[:8], batches)
  _, acc, acc_metrics = _run(_with(bce_only, optim__grad_accum_steps=2), jax.devices()[:8], batches)
  for a, b in zip(big_metrics, acc_metrics):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-6)
  _assert_trees_close(big.params, acc.params)
  _assert_trees_close(big.teacher_params, acc.teacher_params)


# ------------------------------------------------------------- bf16, remat, donation


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _primitive_inputs(jaxpr, name):
  """Input avals of every `name` equation, recursing into sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append([v.aval for v in eqn.invars])
    for sub in _sub_jaxprs(eqn.params):
      found.extend(_primitive_inputs(sub, name))
  return found


def test_bf16_trains_and_keeps_logdet_float32(config):
  cfg = _with(
      config,
      dtype="bfloat16",
      optim__learning_rate=3e-3,
      optim__warmup_steps=1,
      objective__head__reset_every_steps=0,
      total_steps=100,
  )
  batch = helpers.random_batch(cfg, seed=3)

  def run(cfg):
    components, state = helpers.create_state(cfg)
    step_fn = train_step.make_train_step(components, cfg)
    step = jax.jit(step_fn)
    losses = []
    for _ in range(8):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    return step_fn, state, metrics, np.asarray(losses)

  step_fn, state, metrics, losses = run(cfg)
  _, _, _, losses32 = run(_with(cfg, dtype="float32"))
  # bf16 follows the float32 run (the loss moves by ~0.15 over these steps).
  assert np.all(np.isfinite(losses))
  assert np.ptp(losses32) > 0.05, losses32
  np.testing.assert_allclose(losses, losses32, atol=0.03)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
  assert metrics["coding_rate"].dtype == jnp.float32

  jaxpr = jax.make_jaxpr(step_fn)(state, batch).jaxpr
  cholesky = _primitive_inputs(jaxpr, "cholesky")
  assert cholesky and all(a.dtype == jnp.float32 for avals in cholesky for a in avals)
  dots = _primitive_inputs(jaxpr, "dot_general")
  assert sum(avals[0].dtype == jnp.bfloat16 for avals in dots) >= 4  # compute is bf16


def test_remat_gives_same_gradients(config):
  batch = helpers.random_batch(config)
  _, state = helpers.create_state(config)
  remat = _with(config, model__remat=True)

  def grads_fn(cfg):
    components = train_state.build(cfg)
    return lambda s, b: train_step.loss_and_grads(s, b, components, cfg)[3]

  grads = lambda cfg: jax.jit(grads_fn(cfg))(state, batch)
  _assert_trees_close(grads(config), grads(remat), tol=1e-6)

  def num_remats(cfg):
    jaxpr = jax.make_jaxpr(grads_fn(cfg))(state, batch).jaxpr
    return sum(len(_primitive_inputs(jaxpr, name)) for name in ("remat2", "checkpoint"))

  assert num_remats(config) == 0
  assert num_remats(remat) >= config.model.depth


def test_train_state_is_donated(config):
  """The compiled step aliases every state buffer to its output: ~1x state in memory."""
  mesh = sharding_lib.make_mesh(config, jax.devices()[:1])
  components = train_state.build(config)
  shapes = sharding_lib.abstract_state(components, config, mesh)  # sharded shapes
  state_sharding = sharding_lib.shardings_of(shapes)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), helpers.random_batch(config)
  )
  compiled = (
      train_step.compile_train_step(components, config, mesh, state_sharding)
      .lower(shapes, batch)
      .compile()
  )
  memory = compiled.memory_analysis()
  assert memory.alias_size_in_bytes >= 0.95 * state_bytes, (memory, state_bytes)


# ---------------------------------------------------------------- ImageNet presets


@pytest.mark.parametrize(
    "name, model", [("imagenet_vits16", "vit_small"), ("imagenet_vitb16", "vit_base")]
)
def test_imagenet_presets(name, model):
  from bits_jax import config_validation  # pylint: disable=g-import-not-at-top

  for arg, epochs in (("ep100", 100), ("ep300", 300)):
    config = helpers.load_config(name, arg)
    crops, bits = config.input.crops, config.objective.bits
    assert (config.input.dataset, config.model.name, config.model.patch_size) == (
        "imagenet2012",
        model,
        16,
    )
    assert (crops.num_global, crops.global_size) == (2, 224)
    assert (crops.num_local, crops.local_size) == (10, 96)
    assert (config.input.batch_size, bits.num_bits, bits.eps) == (256, 256, 0.05)
    steps_per_epoch = 1_281_167 // 256
    assert config.total_steps == epochs * steps_per_epoch
    assert train_state.build(config).head_reset_every == 10 * steps_per_epoch
    assert config.dtype == "bfloat16"
  config_validation.validate_config(config)
  with pytest.raises(ValueError, match="Unknown preset 'ep50'.*ep100"):
    helpers.load_config(name, "ep50")

  # FSDP over 8 devices: the state per device is about 1/8 of the whole.
  config.mesh = {"data": 1, "fsdp": 8}
  mesh = sharding_lib.make_mesh(config)
  shapes = sharding_lib.abstract_state(train_state.build(config), config, mesh)
  shardings = sharding_lib.shardings_of(shapes)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  per_device = sum(
      np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
      for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings))
  )
  assert per_device < 0.14 * total, (per_device, total)
