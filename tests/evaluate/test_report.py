"""Tests for bits_jax.evaluate.report (results.md as the paper's tables) on hand-made results."""

import ml_collections

from bits_jax.evaluate import report
from tests import helpers


def _imagenet_results(prefix="trained/"):
  return {
      "weights": "/runs/vitb16",
      "step": 500400,
      "method": "bits",
      "dataset": "imagenet2012",
      f"{prefix}knn/knn_top1_k10": 0.70,
      f"{prefix}knn/knn_top1_k20": 0.7312,
      f"{prefix}linear/linear_top1": 0.77,
      f"{prefix}retrieval/map_all": 0.5123,
      f"{prefix}retrieval/codes/256/map_all": 0.47,
      f"{prefix}retrieval/codes/32/map_all": 0.40,
      f"{prefix}retrieval/codes/random32/map_all": 0.38,
      f"{prefix}geometry/d_eff": 350.2,
      f"{prefix}geometry/r_eff": 470.9,
      f"{prefix}codes/bit_entropy_mean": 0.91,
      f"{prefix}codes/block_entropy_mean": 7.05,
      "random_init/knn/knn_top1_k20": 0.05,
  }


def _section(text, title):
  """The lines of the section whose heading starts with `title`."""
  block = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
  return [line for line in block.splitlines() if line.startswith("|")]


def test_paper_setting_puts_the_methods_row_beside_ours():
  config = helpers.load_config("imagenet_vitb16")  # ViT-B/16, 100 epochs, heads reset
  assert report.matches_paper(config) and report.paper_method(config) == "BITS-reset"
  text = report.markdown_report(_imagenet_results(), config)
  tab1 = _section(text, "Tab. 1")
  assert tab1[0] == "| metric | ours | random init | paper (BITS-reset) |"
  assert "| mAP@ALL | 51.23 |  | 50.64 |" in tab1
  assert "| k-NN top-1 (k=20) | 73.12 | 5.00 | 73.5 |" in tab1
  assert "| linear top-1 | 77.00 |  | 77.8 |" in tab1
  assert not any("MLP" in line for line in tab1)  # Absent metrics are skipped.
  assert "| d_eff | 350.2 |  | 358 |" in _section(text, "Tab. 2")
  codes = _section(text, "Sec. 5.5")
  assert "| 8-bit block entropy | 7.050 |  | 7.1 |" in codes
  assert "| Hamming mAP@ALL, 256 bits | 47.00 |  | 47.59 |" in codes
  assert "| Hamming mAP@ALL, random 32 | 38.00 |  |  |" in codes
  for absent in ("Tab. 5", "Tab. 6", "Tab. 7", "Tab. 8"):
    assert f"## {absent}" not in text
  assert "| trained/knn/knn_top1_k20 | 0.7312 |" in _section(text, "All metrics")
  fixed = helpers.load_config("imagenet_vitb16", "fixed")
  assert "| mAP@ALL | 51.23 |  | 43.44 |" in report.markdown_report(_imagenet_results(), fixed)


def test_other_settings_say_not_comparable_and_no_config_no_paper():
  config = helpers.load_config("fashion_mnist", "test")
  assert not report.matches_paper(config)
  text = report.markdown_report(_imagenet_results(""), config)
  assert _section(text, "Tab. 1")[0] == f"| metric | ours | random init | {report.NOT_COMPARABLE} |"
  assert "paper (BITS-" not in text.split("## All metrics")[0].replace("row", "")
  config.model.update(name="vit_base", patch_size=16)
  config.input.dataset = "imagenet2012"
  assert not report.matches_paper(config)  # Not 100 epochs.
  bare = report.markdown_report(_imagenet_results(""), None)
  assert _section(bare, "Tab. 1")[0] == "| metric | ours | random init |"
  assert "| mAP@ALL | 51.23 |  |" in _section(bare, "Tab. 1")


def test_transfer_retrieval_probes_maskcut_and_davis():
  config = helpers.load_config("imagenet_vitb16")
  config.input.dataset = "voc/2012"
  results = {"retrieval/map_all": 0.801, "retrieval/map@10": 0.9}
  text = report.markdown_report(results, config)
  assert _section(text, "Tab. 5: transfer retrieval, Pascal VOC2012") == [
      "| metric | ours | paper (BITS-reset) |",
      "| --- | --- | --- |",
      "| mAP@ALL | 80.10 | 79 |",
  ]
  assert "## Tab. 1" not in text
  # Continued SSL on a target: frozen (init_from/) beside adapted (trained/), no paper values.
  config.input.dataset = "food101"
  probes = {
      "init_from/linear/linear_top1": 0.61,
      "trained/linear/linear_top1": 0.66,
      "trained/linear/mlp_top1": 0.68,
      "init_from/knn/knn_top1_k20": 0.5,
  }
  tab8 = _section(report.markdown_report(probes, config), "Tab. 8")
  assert tab8[0] == "| metric | ours | frozen (init_from) |"
  assert "| linear top-1 | 66.00 | 61.00 |" in tab8 and "| MLP top-1 | 68.00 |  |" in tab8
  assert "| k-NN top-1 (k=20) |  | 50.00 |" in tab8
  # Tab. 6 / 7 from their evaluators (davis: paper_reference of video.py, BITS-fixed).
  config = helpers.load_config("imagenet_vitb16", "fixed")
  dense = {
      "maskcut/box/AP50": 0.3,
      "maskcut/mask/AP": 0.1,
      "davis/JF_mean": 0.6,
      "davis/J_mean": 0.58,
  }
  text = report.markdown_report(dense, config)
  assert "| box AP50 | 30.00 |" in _section(text, "Tab. 6")[2]
  tab7 = _section(text, "Tab. 7")
  assert tab7[2].startswith("| J&F | 60.00 |") and tab7[3].startswith("| J | 58.00 |")
  paper_jf = report._reference("video").get("BITS-fixed", {}).get("JF_mean")  # pylint: disable=protected-access
  if paper_jf is not None:
    assert tab7[2] == f"| J&F | 60.00 | {paper_jf:g} |"


def test_imagenet100_class_list_is_a_tab5_column_beside_tab1():
  config = helpers.load_config("imagenet_vitb16")
  with config.evals.unlocked():
    config.evals.in100 = ml_collections.ConfigDict(
        dict(type="retrieval", query_classes_file="/lists/ImageNet100.txt")
    )
  results = {"trained/retrieval/map_all": 0.51, "trained/in100/map_all": 0.83}
  text = report.markdown_report(results, config)
  assert (
      _section(text, "Tab. 5: transfer retrieval, ImageNet100")[2] == "| mAP@ALL | 83.00 | 82.29 |"
  )
  assert _section(text, "Tab. 1")[2] == "| mAP@ALL | 51.00 | 50.64 |"
