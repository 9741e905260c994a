"""PyTorch <-> Flax mapping: same outputs as timm/torchvision-layout torch models."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bits_jax.models import resnet  # pylint: disable=g-import-not-at-top
from bits_jax.models import torch_mapping
from bits_jax.models import vit
from tests import torch_reference


def _state_dict_np(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _randomize_batchnorm(model, seed):
  """Non-trivial BatchNorm affine params and running stats, so all four are checked."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
        m.bias.copy_(0.1 * torch.randn(c, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(c, generator=gen))


@pytest.fixture(scope="module")
def torch_vit():
  torch.manual_seed(0)
  return torch_reference.vit_small_patch16_224().eval()


@pytest.fixture(scope="module")
def torch_resnet():
  torch.manual_seed(1)
  model = torch_reference.resnet50()
  _randomize_batchnorm(model, 2)
  return model.eval()


def _flax_vit(meta):
  width, depth, heads = vit.VIT_SIZES["small"]
  return vit.ViT(
      width=width,
      depth=depth,
      num_heads=heads,
      patch_size=meta["patch_size"],
      image_size=meta["global_crop_size"],
  )


def test_vit_small_matches_torch_cls_and_patch_tokens(torch_vit):
  variables, meta = torch_mapping.from_torch(_state_dict_np(torch_vit), "vit_small")
  assert meta["patch_size"] == 16 and meta["global_crop_size"] == 224
  assert meta["ignored_keys"] == ["head.bias", "head.weight"]
  images = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
  with torch.no_grad():
    ref = torch_vit.forward_features(torch.from_numpy(images)).numpy()
  out = jax.jit(_flax_vit(meta).apply)(
      {"params": variables["params"]}, images.transpose(0, 2, 3, 1)
  )
  np.testing.assert_array_less(np.abs(np.asarray(out["cls"]) - ref[:, 0]).max(), 1e-4)
  np.testing.assert_array_less(np.abs(np.asarray(out["patch_tokens"]) - ref[:, 1:]).max(), 1e-4)


def test_vit_round_trip_to_torch(torch_vit):
  original = _state_dict_np(torch_vit)
  variables, _ = torch_mapping.from_torch(original, "vit_small")
  exported = torch_mapping.to_torch(variables, "vit_small")
  assert set(exported) == set(original) - {"head.weight", "head.bias"}
  for key, value in exported.items():
    assert value.shape == original[key].shape, key
    if key not in ("cls_token", "pos_embed"):
      np.testing.assert_array_equal(value, original[key], err_msg=key)
  # The CLS position embedding is folded into cls_token and written back as zero.
  np.testing.assert_allclose(
      exported["cls_token"], original["cls_token"] + original["pos_embed"][:, :1], atol=1e-7
  )
  np.testing.assert_array_equal(exported["pos_embed"][:, 0], 0.0)
  np.testing.assert_array_equal(exported["pos_embed"][:, 1:], original["pos_embed"][:, 1:])
  # The exported weights load into the torch model and compute the same function.
  reloaded = torch_reference.vit_small_patch16_224().eval()
  missing, unexpected = reloaded.load_state_dict(
      {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False
  )
  assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
  x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    np.testing.assert_allclose(
        reloaded.forward_features(x).numpy(), torch_vit.forward_features(x).numpy(), atol=1e-5
    )


def test_resnet50_matches_torch_eval_mode(torch_resnet):
  variables, meta = torch_mapping.from_torch(_state_dict_np(torch_resnet), "resnet50")
  assert meta["resnet_small_stem"] is False and meta["resnet_width"] == 64
  assert "fc.weight" in meta["ignored_keys"]
  images = np.random.RandomState(1).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    ref_map = torch_resnet.forward_features(torch.from_numpy(images)).numpy()  # [B, C, h, w]
  model = resnet.ResNet(*resnet.RESNET_SIZES["resnet50"])
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, images.transpose(0, 2, 3, 1)
  )
  b, c, h, w = ref_map.shape
  ref_tokens = ref_map.transpose(0, 2, 3, 1).reshape(b, h * w, c)
  assert np.abs(ref_tokens).max() > 0.1  # the comparison is not between near-zero maps
  np.testing.assert_array_less(np.abs(np.asarray(out["patch_tokens"]) - ref_tokens).max(), 1e-4)
  np.testing.assert_array_less(np.abs(np.asarray(out["cls"]) - ref_map.mean((2, 3))).max(), 1e-4)


def test_resnet50_round_trip_to_torch(torch_resnet):
  original = _state_dict_np(torch_resnet)
  variables, _ = torch_mapping.from_torch(original, "resnet50")
  exported = torch_mapping.to_torch(variables, "resnet50")
  assert set(exported) == set(original) - {"fc.weight", "fc.bias"}
  for key, value in exported.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_wrong_arch_is_a_clear_error(torch_resnet):
  with pytest.raises(ValueError, match="resnet50"):
    torch_mapping.from_torch(_state_dict_np(torch_resnet), "resnet18")
  with pytest.raises(ValueError, match="Unknown --arch"):
    torch_mapping.from_torch({}, "vgg16")


def test_vit_base_heads_layout_matches_torch():
  """ViT-B/16's 12 heads of 64 (2 blocks, 64x64 images, to stay fast)."""
  torch.manual_seed(4)
  model = torch_reference.VisionTransformer(
      img_size=64, embed_dim=768, depth=2, num_heads=12
  ).eval()
  variables, meta = torch_mapping.from_torch(_state_dict_np(model), "vit_base")
  assert meta["patch_size"] == 16 and meta["global_crop_size"] == 64
  images = np.random.RandomState(5).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    ref = model.forward_features(torch.from_numpy(images)).numpy()
  flax_model = vit.ViT(width=768, depth=2, num_heads=12, patch_size=16, image_size=64)
  out = flax_model.apply({"params": variables["params"]}, images.transpose(0, 2, 3, 1))
  np.testing.assert_array_less(np.abs(np.asarray(out["cls"]) - ref[:, 0]).max(), 1e-4)
  np.testing.assert_array_less(np.abs(np.asarray(out["patch_tokens"]) - ref[:, 1:]).max(), 1e-4)
  with pytest.raises(ValueError, match="width 384"):
    torch_mapping.from_torch(_state_dict_np(model), "vit_small")
