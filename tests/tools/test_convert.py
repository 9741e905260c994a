"""The converter on .pth files: CLI import/export, DINO checkpoints, refused pickles."""

import argparse
import json
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bits_jax import weights  # pylint: disable=g-import-not-at-top
from bits_jax.models import torch_mapping
from bits_jax.tools import convert
from tests import torch_reference


class Payload:
  """Pickles to a call of os.system: what a malicious checkpoint would carry."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _state_dict_np(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def torch_vit():
  torch.manual_seed(0)
  return torch_reference.vit_small_patch16_224().eval()


def test_cli_import_and_export(torch_vit, tmp_path):
  pth = str(tmp_path / "dino_vits16.pth")
  # A DINO training checkpoint: networks under 'teacher'/'student', DDP/backbone prefixes.
  sd = {f"module.backbone.{k}": v for k, v in torch_vit.state_dict().items()}
  torch.save({"teacher": sd, "student": sd, "epoch": 3}, pth)
  out = str(tmp_path / "converted")
  with pytest.raises(ValueError, match="--key=teacher"):
    convert.cli(["--from=torch", f"--in={pth}", "--arch=vit_small", "--patch=16", f"--out={out}"])
  with pytest.raises(ValueError, match="patch size 16"):
    convert.cli([
        "--from=torch",
        f"--in={pth}",
        "--arch=vit_small",
        "--patch=8",
        f"--out={out}",
        "--key=teacher",
    ])
  assert (
      convert.cli([
          "--from=torch",
          f"--in={pth}",
          "--arch=vit_small",
          "--patch=16",
          f"--out={out}",
          "--key=teacher",
      ])
      == 0
  )
  meta = json.loads((tmp_path / "converted" / weights.META_FILE).read_text())
  assert meta["model"] == "vit_small" and meta["patch_size"] == 16
  assert weights.read_meta(out) == meta
  loaded, step = weights.load_params(out)
  assert step is None and set(loaded) == {"backbone"}
  expected, _ = torch_mapping.from_torch(_state_dict_np(torch_vit), "vit_small")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["backbone"], expected["params"])

  back = str(tmp_path / "export.pth")
  assert convert.cli(["--from=flax", f"--in={out}", "--arch=vit_small", f"--out={back}"]) == 0
  exported = torch.load(back)
  np.testing.assert_array_equal(
      exported["blocks.3.attn.qkv.weight"].numpy(),
      torch_vit.state_dict()["blocks.3.attn.qkv.weight"].numpy(),
  )


def test_dino_checkpoint_with_args_namespace_loads_weights_only(tmp_path):
  """DINO's checkpoint.pth: argparse args, optimizer state and loss center beside the nets."""
  torch.manual_seed(6)
  model = torch_reference.VisionTransformer(img_size=32, embed_dim=192, depth=1, num_heads=3)
  sd = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
  path = tmp_path / "checkpoint.pth"
  torch.save(
      {
          "teacher": sd,
          "student": sd,
          "epoch": 7,
          "optimizer": optimizer.state_dict(),
          "args": argparse.Namespace(
              arch="vit_tiny",
              patch_size=16,
              lr=5e-4,
              local_crops_scale=(0.05, 0.4),
              data_path="/data",
          ),
          "dino_loss": {"center": torch.zeros(1, 65536)},
      },
      path,
  )
  state_dict = convert.read_torch(path, key="teacher")
  assert set(state_dict) == set(model.state_dict())
  np.testing.assert_array_equal(
      state_dict["blocks.0.mlp.fc1.weight"], model.state_dict()["blocks.0.mlp.fc1.weight"].numpy()
  )
  assert all(isinstance(v, np.ndarray) for v in state_dict.values())


def test_pickle_payload_is_refused_and_not_run(tmp_path):
  marker = tmp_path / "payload_ran"
  path = tmp_path / "malicious.pth"
  torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(str(marker))}, path)
  with pytest.raises(convert.UnsafeCheckpointError, match="Refused to load .*system"):
    convert.read_torch(path)
  with pytest.raises(ValueError, match="--from=safetensors"):
    convert.cli(["--from=torch", f"--in={path}", "--arch=vit_tiny", f"--out={tmp_path / 'out'}"])
  assert not marker.exists()
  assert not (tmp_path / "out").exists()
  # The payload is live: an unrestricted load runs it (what the converter must never do).
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_cli_entry_point_reports_errors_without_traceback(tmp_path):
  missing = tmp_path / "missing.pth"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "bits_jax.tools.convert",
          "--from=torch",
          f"--in={missing}",
          "--arch=vit_tiny",
          f"--out={tmp_path / 'out'}",
      ],
      capture_output=True,
      text=True,
      check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 1, proc.stderr
  assert "convert: " in proc.stderr and "Traceback" not in proc.stderr
  assert "missing.pth" in proc.stderr


def test_core_package_does_not_import_torch():
  code = (
      "import sys; import bits_jax.tools.convert, bits_jax.models.torch_mapping, "
      "bits_jax.weights, bits_jax.train; "
      "assert 'torch' not in sys.modules, 'torch imported'"
  )
  subprocess.run(
      [sys.executable, "-c", code], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )
