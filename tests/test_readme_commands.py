"""The README's commands run as written after the demo; a short run's console stays short.

`test_readme_commands_run_after_the_demo` takes every `python -m bits_jax.*` command of the
README's ```bash blocks, in order, and runs it in a fresh directory holding `configs/` (so
relative paths such as `workdirs/fashion_mnist_bits` resolve as for a user in the
repository), with one change: `configs/fashion_mnist.py` becomes its tiny `:test` preset.
Commands that need what a user brings (TPU pods, clusters, their own weight files) are in
`SKIPPED` with the reason; a README command neither run nor skipped fails the test.
"""

import os
import re
import subprocess
import sys
import time

import helpers
import pytest

README = os.path.join(helpers.REPO, "README.md")
DEMO_CONFIG = "--config=configs/fashion_mnist.py"

# substring of a README command -> why the test does not run it.
SKIPPED = {
    "--config=configs/<name>.py": "a template (<name>, [:preset], ...)",
    "--weights=/path/to/": "a template for the user's own weights",
    "dino_vits16.pth": "needs the user's downloaded DINO checkpoint",
    "--in=model.safetensors": "needs the user's downloaded safetensors file",
    "--in=gs://my-bucket/runs/vits16_reset": "needs an ImageNet ViT-S/16 run in a bucket",
    "imagenet_vitb16.py": "ImageNet on a GPU cluster",
}


def readme_commands() -> list[str]:
  """The `python -m bits_jax.*` commands of the README's bash blocks, in order."""
  with open(README) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for line in block.splitlines():
      match = re.search(r"(?:\.venv/bin/)?python3? -m bits_jax\.\S+.*", line)
      if match and "pytest" not in line:
        commands.append(match.group(0).split(" && ")[0].strip().rstrip('"'))
  return commands


def _runnable(command: str) -> str:
  """The command as the test runs it: this interpreter, optional [...] parts dropped, and
  the Fashion-MNIST config's tiny preset."""
  command = re.sub(r"\s*\[[^\]]*\]", "", command)
  command = re.sub(r"^(?:\.venv/bin/)?python3? ", f"{sys.executable} ", command)
  return re.sub(re.escape(DEMO_CONFIG) + r"(?=\s|$)", DEMO_CONFIG + ":test", command)


def test_readme_has_the_commands_this_test_runs():
  commands = readme_commands()
  assert any("bits_jax.main" in c and DEMO_CONFIG in c for c in commands), commands
  for pattern in SKIPPED:
    assert any(pattern in c for c in commands), f"SKIPPED entry {pattern!r} is stale"


def _env(tmp_path):
  """A user's environment: the repository importable, an empty TFDS data dir (a half-prepared
  ~/tensorflow_datasets on the test machine makes TFDS warn at every lookup)."""
  env = dict(os.environ, PYTHONPATH=helpers.REPO, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  env.pop("PYTEST_CURRENT_TEST", None)
  # One CPU device, as for a user (conftest fakes 8 for the in-process tests).
  env["XLA_FLAGS"] = helpers.xla_flags()
  return env


@pytest.mark.slow
def test_readme_commands_run_after_the_demo(tmp_path):
  os.symlink(os.path.join(helpers.REPO, "configs"), tmp_path / "configs")
  ran, timings = [], []
  for command in readme_commands():
    if any(pattern in command for pattern in SKIPPED):
      continue
    t0 = time.time()
    result = subprocess.run(
        _runnable(command),
        shell=True,
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    timings.append((command[:70], round(time.time() - t0)))
    assert (
        result.returncode == 0
    ), f"README command failed ({result.returncode}): {command}\n{result.stderr[-3000:]}"
    ran.append(command)
  print("README commands (s):", timings)
  assert any("bits_jax.main" in c for c in ran)
  assert any("bits_jax.evaluate" in c for c in ran)
  assert not os.path.exists(tmp_path / "gs:")


def test_short_run_prints_at_most_15_lines(tmp_path):
  """20 steps logged every 5, checkpoint and the end-of-run k-NN: default verbosity."""
  os.symlink(os.path.join(helpers.REPO, "configs"), tmp_path / "configs")
  command = [
      sys.executable,
      "-m",
      "bits_jax.main",
      "--config=configs/fashion_mnist.py:test",
      "--workdir=workdirs/short",
      "--config.total_steps=20",
      "--config.log_every=5",
      "--config.checkpoint_every=10",
  ]
  result = subprocess.run(
      command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).splitlines()
  assert len(lines) <= 15, "\n".join(lines)
  progress = [line for line in result.stdout.splitlines() if " | loss " in line]
  assert len(progress) == 4 and all(line.startswith("step ") for line in progress), progress
