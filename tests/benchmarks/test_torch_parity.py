"""benchmarks/torch_reference.py computes our BITS loss: same weights and batch, same numbers."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bits_jax.models import heads
from bits_jax.models import vit
from bits_jax.objectives import bits
from bits_jax.objectives import coding_rate

torch = pytest.importorskip("torch")

_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "benchmarks",
    "torch_reference.py",
)
EPS = 0.05
CR_WEIGHT = 0.1


def _load_reference():
  spec = importlib.util.spec_from_file_location("benchmarks_torch_reference", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _random_params(shapes, seed: int = 0):
  """Our params tree with random values (non-zero biases, so the mapping of each is tested)."""
  rng = np.random.RandomState(seed)

  def draw(path, x):
    name, parent = str(path[-1].key), str(path[-2].key)
    if name == "kernel":
      fan_in = x.shape[0] if parent in ("query", "key", "value") else np.prod(x.shape[:-1])
      return rng.randn(*x.shape).astype(np.float32) / np.sqrt(fan_in)
    if name == "scale":
      return 1.0 + 0.1 * rng.randn(*x.shape).astype(np.float32)
    return 0.05 * rng.randn(*x.shape).astype(np.float32)  # biases, pos_embed, cls_token

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _ours(num_bits: int, bottleneck_dim: int = 16):
  backbone = vit.ViT(width=32, depth=1, num_heads=2, patch_size=4, image_size=16)
  head = heads.BitsHead(bits=num_bits, hidden_dim=64, bottleneck_dim=bottleneck_dim, num_layers=3)
  shapes = jax.eval_shape(
      lambda k: {
          "backbone": backbone.init(k, jnp.zeros((1, 16, 16, 3)))["params"],
          "head": head.init(k, jnp.zeros((1, 32)))["params"],
      },
      jax.random.PRNGKey(0),
  )

  def logits(params, views):  # [B, V, H, W, C] -> [V, B, bits]
    b, v = views.shape[:2]
    feats = backbone.apply(
        {"params": params["backbone"]}, views.reshape((b * v,) + views.shape[2:])
    )["cls"]
    out = head.apply({"params": params["head"]}, feats)
    return jnp.swapaxes(out.reshape(b, v, -1), 0, 1)

  def loss(params, global_views, local_views):
    student_global = logits(params, global_views)
    teacher = jax.lax.stop_gradient(student_global)  # the teacher has the student's weights
    student = jnp.concatenate([student_global, logits(params, local_views)])
    bce, _ = bits.agreement(student, bits.messages(teacher))
    rate = jnp.mean(jnp.stack([coding_rate.coding_rate(student[g], EPS) for g in range(2)]))
    n, d = student.shape[1:]
    return bce - CR_WEIGHT * (d + n) / (d * n) * rate, (bce, rate)

  return _random_params(shapes), loss


@pytest.mark.parametrize("bottleneck_dim", [0, 16])  # the paper's head; the first landing's
def test_torch_reference_loss_and_gradients_equal_ours(bottleneck_dim):
  """Teacher = student weights; 2 global 16 px + 2 local 8 px crops, batch 8, 32 bits."""
  ref = _load_reference()
  params, loss_fn = _ours(32, bottleneck_dim)
  rng = np.random.RandomState(0)
  global_views = rng.randn(8, 2, 16, 16, 3).astype(np.float32)
  local_views = rng.randn(8, 2, 8, 8, 3).astype(np.float32)
  (loss, (bce, rate)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, global_views, local_views
  )

  student = ref.make_student(
      image_size=16,
      patch_size=4,
      channels=3,
      width=32,
      depth=1,
      num_heads=2,
      bits=32,
      head_hidden_dim=64,
      head_bottleneck_dim=bottleneck_dim,
  )
  ref.load_flax_params(student, params)
  crops = ref.images_to_torch(global_views) + ref.images_to_torch(local_views)
  with torch.no_grad():
    teacher_logits = student(crops[:2])
  torch_loss, parts = ref.bits_loss(
      student(crops), teacher_logits, coding_rate_weight=CR_WEIGHT, eps=EPS
  )
  torch_loss.backward()

  np.testing.assert_allclose(parts["bce"].item(), bce, rtol=1e-4)
  np.testing.assert_allclose(parts["coding_rate"].item(), rate, rtol=1e-4)
  np.testing.assert_allclose(torch_loss.item(), loss, rtol=1e-4)
  # Gradients through the whole model agree too (so the benchmark times the same work).
  torch_grads = {
      "qkv": student.backbone.blocks[0].attn.qkv.weight.grad.numpy(),
      "fc1": student.backbone.blocks[0].mlp.fc1.weight.grad.numpy(),
      "pos_embed": student.backbone.pos_embed.grad.numpy(),
      "logits": student.head.logits.weight.grad.numpy(),
  }
  attn = grads["backbone"]["block0"]["attn"]
  ours = {
      "qkv": np.concatenate(
          [np.asarray(attn[n]["kernel"]).reshape(32, 32).T for n in ("query", "key", "value")]
      ),
      "fc1": np.asarray(grads["backbone"]["block0"]["mlp"]["fc1"]["kernel"]).T,
      "pos_embed": np.asarray(grads["backbone"]["pos_embed"]),
      "logits": np.asarray(grads["head"]["logits"]["kernel"]).T,
  }
  for name, g in ours.items():
    scale = np.max(np.abs(g))
    assert scale > 0, name
    np.testing.assert_allclose(torch_grads[name], g, atol=1e-3 * scale, err_msg=name)


@pytest.mark.parametrize("n,d", [(8, 4), (6, 16)])
def test_torch_coding_rate_equals_ours(n, d):
  """Both Gram matrices: [d, d] when d <= n, [n, n] otherwise."""
  ref = _load_reference()
  z = np.random.RandomState(n * d).randn(n, d).astype(np.float32)
  np.testing.assert_allclose(
      ref.coding_rate(torch.from_numpy(z), EPS).item(),
      jax.jit(coding_rate.coding_rate, static_argnums=1)(z, EPS),
      rtol=1e-4,
  )


def test_torch_tanh_gelu_mlp_equals_ours():
  ref = _load_reference()
  block = vit.MlpBlock(hidden_dim=16, gelu_approximate=True)
  params = _random_params(
      jax.eval_shape(lambda k: block.init(k, jnp.zeros((1, 8)))["params"], jax.random.PRNGKey(0))
  )
  mlp = ref.Mlp(8, 16, gelu_approximate=True)
  sd = {}
  for fc in ("fc1", "fc2"):
    sd[f"{fc}.weight"] = torch.from_numpy(params[fc]["kernel"].T.copy())
    sd[f"{fc}.bias"] = torch.from_numpy(params[fc]["bias"])
  mlp.load_state_dict(sd)
  x = 2.0 * np.random.RandomState(2).randn(4, 8).astype(np.float32)
  with torch.no_grad():
    got = mlp(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(got, block.apply({"params": params}, x), rtol=1e-4, atol=1e-5)
  exact = vit.MlpBlock(hidden_dim=16).apply({"params": params}, x)
  assert np.max(np.abs(got - np.asarray(exact))) > 1e-4  # the option changes the function


def test_trainer_step_updates_student_and_teacher():
  ref = _load_reference()
  student = ref.make_student(
      image_size=16,
      patch_size=4,
      channels=3,
      width=16,
      depth=1,
      num_heads=2,
      bits=8,
      head_hidden_dim=16,
      head_bottleneck_dim=8,
  )
  trainer = ref.BitsTrainer(student, learning_rate=1e-3, teacher_momentum=0.9)
  before = [p.detach().clone() for p in student.parameters()]
  teacher_before = [p.detach().clone() for p in trainer.teacher.parameters()]
  crops = ref.images_to_torch(np.random.RandomState(1).randn(4, 3, 16, 16, 3))
  out = trainer.step(crops[:2], crops[2:])
  assert np.isfinite(out["loss"].item())
  moved = [not torch.equal(a, p) for a, p in zip(before, student.parameters())]
  assert all(moved)
  for t0, t1, s1 in zip(teacher_before, trainer.teacher.parameters(), student.parameters()):
    torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1.detach())
