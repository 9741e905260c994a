"""The converter on safetensors files, with `import torch` made impossible."""

import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from bits_jax import weights
from bits_jax.models import torch_mapping
from bits_jax.models import vit
from bits_jax.tools import convert


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError


@pytest.fixture(scope="module")
def vit_tiny_params():
  """Our ViT with vit_tiny's width and heads, one block, 32x32 images (2x2 patches of 16)."""
  model = vit.ViT(width=192, depth=1, num_heads=3, patch_size=16, image_size=32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return jax.tree_util.tree_map(np.asarray, params)


def _header(path) -> dict:
  """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
  data = epath.Path(path).read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8 : 8 + length])


def test_round_trip_through_safetensors_without_torch(vit_tiny_params, tmp_path):
  src = weights.save_params(tmp_path / "src", {"backbone": vit_tiny_params})
  file = str(tmp_path / "vit_tiny.safetensors")
  assert convert.cli(["--from=flax", f"--in={src}", "--arch=vit_tiny", f"--out={file}"]) == 0
  header = _header(file)
  assert header["__metadata__"] == {"format": "pt", "arch": "vit_tiny"}
  assert header["blocks.0.attn.qkv.weight"]["shape"] == [3 * 192, 192]
  assert header["pos_embed"]["shape"] == [1, 1 + 4, 192]  # timm layout: CLS position first
  assert "blocks.1.norm1.weight" not in header

  back = str(tmp_path / "back")
  assert (
      convert.cli(
          ["--from=safetensors", f"--in={file}", "--arch=vit_tiny", "--patch=16", f"--out={back}"]
      )
      == 0
  )
  loaded, _ = weights.load_params(back)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["backbone"], vit_tiny_params)
  meta = weights.read_meta(back)
  assert (meta["model"], meta["patch_size"], meta["global_crop_size"], meta["num_channels"]) == (
      "vit_tiny",
      16,
      32,
      3,
  )
  assert convert.config_overrides(meta) == [
      "--config.model.name=vit_tiny",
      "--config.model.patch_size=16",
      "--config.input.crops.global_size=32",
      "--config.input.num_channels=3",
  ]
  with pytest.raises(ImportError, match="needs PyTorch"):
    convert.cli(
        ["--from=safetensors", f"--in={file}", "--arch=vit_tiny", f"--out={tmp_path / 'x.pth'}"]
    )


def _bfloat16_safetensors(arrays) -> bytes:
  """A safetensors file of `arrays` in BF16, written by hand from the format's definition."""
  header, blobs, offset = {}, [], 0
  for name, value in arrays.items():
    blob = np.ascontiguousarray(value).astype(ml_dtypes.bfloat16).tobytes()
    header[name] = {
        "dtype": "BF16",
        "shape": list(value.shape),
        "data_offsets": [offset, offset + len(blob)],
    }
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def test_bfloat16_dino_file_needs_key(vit_tiny_params, tmp_path):
  """A flat teacher./student. file in bfloat16 (numpy's backend alone cannot read it)."""
  state = torch_mapping.to_torch({"params": vit_tiny_params}, "vit_tiny")
  path = tmp_path / "dino.safetensors"
  path.write_bytes(
      _bfloat16_safetensors({
          f"{net}.{name}": value for net in ("teacher", "student") for name, value in state.items()
      })
  )
  with pytest.raises(ValueError, match="--key=teacher"):
    convert.read_safetensors(path)
  with pytest.raises(KeyError, match="'student', 'teacher'"):
    convert.read_safetensors(path, key="ema")
  variables, _ = torch_mapping.from_torch(convert.read_safetensors(path, key="teacher"), "vit_tiny")
  rounded = jax.tree_util.tree_map(
      lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), vit_tiny_params
  )
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"], rounded)


def _redirect_gs(root):
  """An epath mock function sending gs://BUCKET/... to ROOT/BUCKET/... (a local stand-in)."""

  def redirect(original, path, *args, **kwargs):
    path = os.fspath(path)
    if path.startswith("gs://"):
      path = os.path.join(root, path[len("gs://") :])
    return original(path, *args, **kwargs)

  return redirect


def test_safetensors_and_resolution_on_an_object_store_path(vit_tiny_params, tmp_path, monkeypatch):
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past mock_epath's backend.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  fns = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "stat", "glob", "remove")
  with epath_testing.mock_epath(**{fn: _redirect_gs(str(tmp_path)) for fn in fns}):
    state = torch_mapping.to_torch({"params": vit_tiny_params}, "vit_tiny")
    convert.write_safetensors(state, "gs://bucket/weights/vit.safetensors", {"arch": "vit_tiny"})
    assert (tmp_path / "bucket" / "weights" / "vit.safetensors").exists()
    read = convert.read_safetensors("gs://bucket/weights/vit.safetensors")
    assert sorted(read) == sorted(state)

    for step in (100, 200):
      epath.Path(f"gs://bucket/run/checkpoints/{step}/default").mkdir(parents=True)
    epath.Path("gs://bucket/run/checkpoints/300").mkdir()  # no item yet: incomplete
    directory, step = weights.resolve_checkpoint("gs://bucket/run")
    assert (os.fspath(directory), step) == ("gs://bucket/run/checkpoints/200/default", 200)
    directory, step = weights.resolve_checkpoint("gs://bucket/run/checkpoints/100")
    assert (os.fspath(directory), step) == ("gs://bucket/run/checkpoints/100/default", 100)
