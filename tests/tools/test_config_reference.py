"""The README's config reference is generated from the defaults and kept in sync."""

import os
import subprocess
import sys

import pytest

from bits_jax import config_defaults
from bits_jax import config_validation
from bits_jax.tools import config_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(table: str) -> dict[str, tuple[str, str]]:
  """{key: (default, meaning)} of the Markdown table."""
  rows = {}
  for line in table.splitlines()[2:]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    assert len(cells) == 3, line
    rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
  return rows


def test_every_default_key_has_a_row_with_a_meaning():
  rows = _rows(config_reference.reference_markdown())
  keys = [k for k, _ in config_validation.flat_items(config_defaults.base_config())]
  assert list(rows) == keys
  assert "optim.learning_rate" in rows and "objective.bits.eps" in rows
  missing = [k for k, (_, meaning) in rows.items() if not meaning]
  assert not missing, f"keys without a comment in bits_jax/config_defaults.py: {missing}"


def test_meanings_are_the_comments_beside_or_above_the_key():
  rows = _rows(config_reference.reference_markdown())
  assert rows["total_steps"] == ("1000", "updates in the run (schedules are over these)")
  assert rows["objective.bits.eps"] == ("0.05", "coding-rate distortion")
  # A comment on the lines above a key.
  assert rows["init_from"][1].startswith("Continued SSL from other weights")
  # A key without its own comment takes its section's; '|' cannot break the table.
  assert rows["evals.knn.ks"][1].startswith("Weighted k-NN top-1")
  assert rows["dtype"][1] == "compute dtype: 'float32' / 'bfloat16' (params stay float32)"


def test_readme_holds_the_generated_reference():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert config_reference.BEGIN in readme and config_reference.END in readme, (
      "README.md has no config-reference block: run "
      "`python -m bits_jax.tools.config_reference --write=README.md` after adding the "
      "BEGIN/END marker lines"
  )
  block = readme.split(config_reference.BEGIN, 1)[1].split(config_reference.END, 1)[0]
  assert block == "\n" + config_reference.reference_markdown(), (
      "README.md's config reference is stale: run "
      "`python -m bits_jax.tools.config_reference --write=README.md`"
  )


def test_replace_block_is_idempotent_and_keeps_the_rest():
  text = f"intro\n{config_reference.BEGIN}\nold table\n{config_reference.END}\noutro\n"
  once = config_reference.replace_block(text, "| new |\n")
  assert once == f"intro\n{config_reference.BEGIN}\n| new |\n{config_reference.END}\noutro\n"
  assert config_reference.replace_block(once, "| new |\n") == once
  with pytest.raises(ValueError, match="no config-reference block"):
    config_reference.replace_block("no markers here", "| new |\n")


@pytest.mark.parametrize("content", [None, "a file without the markers\n"])
def test_write_to_a_missing_or_unmarked_file_is_a_one_line_usage_error(tmp_path, content):
  target = tmp_path / "NOTES.md"
  if content is not None:
    target.write_text(content)
  result = subprocess.run(
      [sys.executable, "-m", "bits_jax.tools.config_reference", f"--write={target}"],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 1, result
  assert "Traceback" not in result.stderr, result.stderr
  assert f"--write={target}" in result.stderr, result.stderr
  assert target.exists() == (content is not None)
  if content is not None:
    assert target.read_text() == content, "nothing is written when the block is missing"
