"""benchmarks/xla_options.py: option-set parsing, the table, and one short run."""

import json
import os
import sys

import pytest

import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "benchmarks"))
import xla_options as xla_options_module  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(name="xla_options")
def _xla_options():
  return xla_options_module


def test_parse_set_reads_typed_options(xla_options):
  name, options = xla_options.parse_set(
      "mixed: xla_cpu_enable_fast_math=true;xla_cpu_parallel_codegen_split_count=4;"
      "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"
  )
  assert name == "mixed"
  assert options == {
      "xla_cpu_enable_fast_math": True,
      "xla_cpu_parallel_codegen_split_count": 4,
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT",
  }
  assert xla_options.parse_set("project:") == ("project", {})


@pytest.mark.parametrize("text", ["no_colon", ":xla_cpu_enable_fast_math=true", "a:no_value"])
def test_parse_set_names_the_format(xla_options, text):
  with pytest.raises(ValueError, match="NAME:OPTION=VALUE"):
    xla_options.parse_set(text)


def test_default_sets_parse_and_start_with_the_project(xla_options):
  sets = dict(xla_options.parse_set(s) for s in xla_options.DEFAULT_SETS)
  assert next(iter(sets.items())) == ("project", {})
  assert len(sets) == len(xla_options.DEFAULT_SETS)


def test_table_ratio_is_the_median_of_per_round_ratios(xla_options):
  times = {"project": [0.1, 0.2, 0.4], "other": [0.2, 0.2, 0.2]}
  text = xla_options.table(times, images=10, base="project")
  rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
  assert "| 200.0 | 50.0 | 1.000x |" in rows["project"]  # median 0.2 s
  assert "| 200.0 | 50.0 | 1.000x |" in rows["other"]  # ratios 2, 1, 0.5


@pytest.mark.slow
def test_run_times_each_set_and_skips_an_unknown_option(xla_options, tmp_path, capsys):
  out = tmp_path / "sets.json"
  xla_options.main([
      "--config=" + os.path.join(helpers.REPO, "configs", "fashion_mnist.py") + ":test",
      "--rounds=2",
      "--steps=1",
      "--set=project:",
      "--set=fast:xla_cpu_enable_fast_math=true",
      "--set=bad:xla_cpu_no_such_option=1",
      f"--json_out={out}",
  ])
  printed = capsys.readouterr().out
  assert "bad: not compiled" in printed
  timings = json.loads(out.read_text())["seconds_per_step"]
  assert sorted(timings) == ["fast", "project"]
  assert all(len(t) == 2 and min(t) > 0 for t in timings.values())
