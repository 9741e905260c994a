"""benchmarks/reproduce.py: the table, the overrides and the code-key renaming (no training)."""

import os
import sys

import pytest

import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "benchmarks"))
import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position


def _row(method, seed, knn, codes=None, acc=None):
  metrics = {"knn/knn_top1_k20": knn, "retrieval/map_all": knn / 2}
  if codes is not None:
    metrics["retrieval/codes/code/map_all"] = codes
  row = {"method": method, "seed": seed, "metrics": metrics}
  if acc:
    row["bit_accuracy"] = acc
  return row


def test_table_mean_std_per_method_and_missing_metrics():
  rows = [
      _row("pixels", 0, 0.85),
      _row("bits", 0, 0.80, 0.4, {"25": 0.6, "300": 0.8}),
      _row("bits", 1, 0.90, 0.5, {"25": 0.55, "300": 0.75}),
      _row("dino", 0, 0.70),
  ]
  table = reproduce.markdown_table(rows, ["dino", "bits"]).splitlines()
  assert table[0].startswith("| method | runs | k-NN top-1 |")
  pixels, dino, bits = table[2], table[3], table[4]
  assert pixels.startswith("| raw pixels | 1 | 85.00 |")
  assert dino.startswith("| DINO | 1 | 70.00 |")
  # mean 85, sample std of (80, 90) = 7.07; codes mAP 45 +- 7.07; both bit-accuracy curves.
  assert bits.startswith("| BITS-reset | 2 | 85.00 ± 7.07 |")
  assert "45.00 ± 7.07" in bits and "0.575 -> 0.775 |" in bits  # one segment, mean of 2 runs
  assert dino.count("| - |") >= 1  # DINO has no codes


def test_code_key_names_one_code_per_run():
  renamed = reproduce._code_key({"retrieval/codes/256/map_all": 1.0, "retrieval/map_all": 2.0})
  assert renamed == {"retrieval/codes/code/map_all": 1.0, "retrieval/map_all": 2.0}


def test_overrides_parse_literals_and_reject_unknown_keys():
  config = helpers.load_config("fashion_mnist", "test")
  reproduce.apply_overrides(
      config, ["optim.learning_rate=2e-3", "input.crops.global_scale=[0.3, 1.0]"]
  )
  assert config.optim.learning_rate == 2e-3
  assert config.input.crops.global_scale == (0.3, 1.0)
  with pytest.raises(ValueError, match="no key"):
    reproduce.apply_overrides(config, ["optim.learning_rat=1"])


def test_bit_accuracy_per_head_segment():
  history = {"25": 0.8, "100": 0.9, "125": 0.7, "200": 0.85, "225": 0.6, "300": 0.65}
  assert reproduce.segment_accuracy(history, 100) == [(0.8, 0.9), (0.7, 0.85), (0.6, 0.65)]
  assert reproduce.segment_accuracy(history, 0) == [(0.8, 0.65)]
  runs = [
      {"bit_accuracy": history, "reset_every_steps": 100},
      {"bit_accuracy": {"50": 0.6, "100": 0.8, "150": 0.5, "200": 0.7}, "reset_every_steps": 100},
  ]
  # Segments both runs have, each the mean over the runs.
  assert reproduce._segments_cell(runs) == "0.700 -> 0.850, 0.600 -> 0.775"  # pylint: disable=protected-access
