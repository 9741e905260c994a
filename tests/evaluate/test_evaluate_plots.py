"""Tests for bits_jax.evaluate.plots."""

import os
import subprocess
import sys

import numpy as np
import pytest

import helpers

from bits_jax.evaluate import codes
from bits_jax.evaluate import plots
from bits_jax.evaluate import retrieval


class _RecordingWriter:

  def __init__(self):
    self.calls = []

  def write_images(self, step, images):
    self.calls.append((step, images))


def _inputs():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 15)
  logits = rng.normal(size=(60, 24)) + 2.0 * (labels[:, None] == (np.arange(24) % 4))
  analysis = codes.analyze_codes(logits, labels)
  bits = logits > 0
  hamming = retrieval.hamming_retrieval(
      bits[:10], labels[:10], bits[10:], labels[10:], precision_at=(1, 5, 20)
  )
  cosine = retrieval.cosine_retrieval(
      logits[:10], labels[:10], logits[10:], labels[10:], precision_at=(1, 5, 20)
  )
  return analysis, hamming, cosine


def test_save_plots_writes_pngs_and_logs_them(tmp_path):
  analysis, hamming, cosine = _inputs()
  paths = plots.save_plots(analysis, {"hamming": hamming, "cosine": cosine}, str(tmp_path / "figs"))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == [
      "bit_balance.png",
      "bit_correlation.png",
      "class_bit_activation.png",
      "retrieval_precision.png",
  ]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  writer = _RecordingWriter()
  plots.log_plots(writer, 7, paths)
  ((step, images),) = writer.calls
  assert step == 7
  assert sorted(images) == ["plots/" + n[:-4] for n in names]
  for image in images.values():
    assert image.dtype == np.uint8 and image.ndim == 4
    assert image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] > 100 and image.shape[2] > 100
    assert image.std() > 0  # Not a blank canvas.


def test_partial_inputs_and_flat_retrieval_dict(tmp_path):
  _, hamming, _ = _inputs()
  paths = plots.save_plots(None, hamming, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["retrieval_precision.png"]
  assert plots.save_plots(None, None, str(tmp_path)) == []
  with pytest.raises(ValueError, match="precision_at"):
    plots.save_plots(None, {"map@all": 0.5}, str(tmp_path))


def test_plots_leave_the_process_backend_and_pyplot_alone(tmp_path):
  """A notebook trains in its kernel: the evaluators' figures must not turn its inline plots
  off (they did: importing this module switched the backend to Agg)."""
  script = f"""
import sys
import matplotlib
matplotlib.use("svg")
import numpy as np
from bits_jax.evaluate import plots
plots.plot_bit_balance(np.linspace(0, 1, 32), {str(tmp_path / "balance.png")!r})
plots.plot_embedding_3d(np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 3,
                        {str(tmp_path / "tsne.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
  env = dict(os.environ, PYTHONPATH=helpers.REPO, MPLBACKEND="")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
  for name in ("balance.png", "tsne.png"):
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
