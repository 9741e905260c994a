"""results.md: the evaluation's numbers grouped as the paper's tables, the paper's beside them.

`markdown_report(results, config)` turns the flat results of `run.evaluate` or
`train.train_and_evaluate` ('<eval>/<metric>' keys, optionally under 'trained/',
'init_from/', 'random_init/') into sections

  Tab. 1   mAP@ALL, k-NN top-1, linear top-1 on the pre-training dataset
  Tab. 2   d_eff, r_eff of the backbone-feature covariance
  Tab. 5   retrieval mAP@ALL on a transfer dataset (ImageNetV2, ImageNet100, VOC, COCO)
  Sec. 5.5 codes: marginal and 8-bit block entropy, code mAP per code length
  Tab. 6   MaskCut AP50 / AP75 / AP (paper values: `maskcut.paper_reference`)
  Tab. 7   DAVIS-2017 J&F (paper values: `video.paper_reference`)
  Tab. 8   transfer probes: mAP, k-NN, linear, MLP, frozen ('init_from/') and adapted

then every metric in one flat table. A section, row or column whose metrics are absent is left
out. Rates are printed as percentages like the paper's.

The paper's figures (../shared/PAPER.md) stand in a column beside ours, for the paper's row of
the run's method (DINO, SimDINO, BITS-fixed, BITS-reset: head re-initialised every n epochs).
The column is headed "paper (<method>)" only when the setting matches the paper's:
`config.input.dataset` imagenet2012, a ViT-B/16 (`vit_base`, or `vit` 768 wide, 12 deep,
patch 16) and 100 epochs (+-2%) of training (Tab. 5: the model only, the dataset being the
column's). Otherwise it is still printed, headed "paper (ImageNet-1k ViT-B/16, not
comparable)", so the reference stays in view without being mistaken for a like-for-like
comparison. Without a config there is no paper column: the setting cannot be decided.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import numpy as np

IMAGENET_TRAIN_EXAMPLES = 1_281_167
NOT_COMPARABLE = "paper (ImageNet-1k ViT-B/16, not comparable)"
# Result prefixes of train_and_evaluate -> column names (in this order).
_GROUPS = (("", "ours"), ("trained/", "ours"), ("init_from/", "frozen (init_from)"))
_GROUPS_RANDOM = (("random_init/", "random init"),)

# ../shared/PAPER.md, percentages (d_eff, r_eff and entropies as they are).
PAPER_TAB1 = {  # method -> (mAP@ALL, k-NN, linear)
    "DINO": (35.68, 72.39, 76.3),
    "SimDINO": (38.62, 69.52, 75.3),
    "BITS-fixed": (43.44, 73.32, 76.7),
    "BITS-reset": (50.64, 73.5, 77.8),
}
PAPER_TAB2 = {  # method -> (d_eff, r_eff)
    "DINO": (233.0, 400.0),
    "SimDINO": (156.0, 324.0),
    "BITS-fixed": (250.0, 404.0),
    "BITS-reset": (358.0, 480.0),
}
PAPER_TAB5 = {  # BITS-reset's retrieval mAP on the transfer datasets
    "ImageNetV2": 52.9,
    "ImageNet100": 82.29,
    "Pascal VOC2012": 79.0,
    "COCO2014": 85.31,
}
PAPER_SEC55 = {  # code analysis (the method is not stated)
    "bit_entropy_mean": 0.9,
    "block_entropy_mean": 7.1,
    "map_all@256": 47.59,
    "map_all@128": 45.97,
    "map_all@64": 43.73,
    "map_all@32": 40.35,
}
_CODE_MAP = re.compile(r"/codes/(\d+)/map_all$")  # retrieval's code mAP per code length
_TAB5_DATASETS = {"imagenet_v2": "ImageNetV2", "voc": "Pascal VOC2012", "coco": "COCO2014"}


def paper_method(config) -> Optional[str]:
  """The paper's row for the run's objective: 'DINO', 'SimDINO', 'BITS-fixed', 'BITS-reset'."""
  objective = config.get("objective", {})
  name = str(objective.get("name", ""))
  if name == "dino":
    return "DINO"
  if name == "simdino":
    return "SimDINO"
  if name != "bits":
    return None
  resets = 0
  for section in ("head", "bits"):
    part = objective.get(section, {}) or {}
    resets += int(part.get("reset_every_steps", 0) or 0) + int(
        part.get("reset_every_epochs", 0) or 0
    )
  return "BITS-reset" if resets else "BITS-fixed"


def is_vit_b16(config) -> bool:
  model = config.get("model", {})
  name, patch = str(model.get("name", "")), int(model.get("patch_size", 0) or 0)
  if patch != 16:
    return False
  if name == "vit_base":
    return True
  return name == "vit" and model.get("width") == 768 and model.get("depth") == 12


def _base_dataset(dataset) -> str:
  """'imagenet2012:5.1.0' -> 'imagenet2012', 'voc/2012' -> 'voc'."""
  return re.split(r"[:/]", str(dataset), maxsplit=1)[0]


def matches_paper(config) -> bool:
  """ImageNet-1k, ViT-B/16, 100 epochs (+-2%): the setting of the paper's Tab. 1 and 2."""
  if _base_dataset(config.input.dataset) != "imagenet2012" or not is_vit_b16(config):
    return False
  epochs = (
      int(config.get("total_steps", 0)) * int(config.input.batch_size) / IMAGENET_TRAIN_EXAMPLES
  )
  return abs(epochs - 100) <= 2


def _eval_names(config, results) -> dict[str, list[str]]:
  """Evaluator type -> the names of its `config.evals` entries (type = name without config)."""
  if config is not None and "evals" in config:
    names: dict[str, list[str]] = {}
    for name, entry in config.evals.items():
      names.setdefault(str(entry.get("type", name)), []).append(name)
    return names
  prefixes = tuple(p for p, _ in _GROUPS + _GROUPS_RANDOM if p)
  seen = set()
  for key in results:
    for prefix in prefixes:
      key = key[len(prefix) :] if key.startswith(prefix) else key
    if "/" in key:
      seen.add(key.split("/")[0])
  return {name: [name] for name in seen}


def _percent(value) -> str:
  return f"{100 * float(value):.2f}"


def _plain(digits: int):
  return lambda value: f"{float(value):.{digits}f}"


class _Lookup:
  """Finds '<group prefix><eval name>/<metric>' values for evaluators of one type."""

  def __init__(self, results, names, groups):
    self.results, self.names = results, names
    self.groups = [(p, c) for p, c in groups if any(k.startswith(p) for k in results)]
    if any(p == "trained/" for p, _ in self.groups):
      self.groups = [(p, c) for p, c in self.groups if p != ""]

  def value(self, group: str, kind: str, metric: str):
    for name in self.names.get(kind) or (kind,):
      value = self.results.get(f"{group}{name}/{metric}")
      if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        if math.isfinite(float(value)):
          return float(value)
    return None

  def metric(self, kind: str, pattern: str) -> Optional[str]:
    """The first metric name of evaluator `kind` matching `pattern` (a regex), by result order."""
    for key in self.results:
      for group, _ in self.groups:
        for name in self.names.get(kind) or (kind,):
          head = f"{group}{name}/"
          if key.startswith(head) and re.fullmatch(pattern, key[len(head) :]):
            return key[len(head) :]
    return None


def _table(title, note, rows, lookup, paper_header=None) -> list[str]:
  """A section: rows [(label, kind, metric, fmt, paper value or None)] x our groups."""
  body = []
  for label, kind, metric, fmt, paper in rows:
    if metric is None:
      continue
    ours = [lookup.value(g, kind, metric) for g, _ in lookup.groups]
    if all(v is None for v in ours):
      continue
    cells = ["" if v is None else fmt(v) for v in ours]
    if paper_header:
      cells.append("" if paper is None else f"{paper:g}")
    body.append(f"| {label} | " + " | ".join(cells) + " |")
  if not body:
    return []
  header = ["metric"] + [c for _, c in lookup.groups] + ([paper_header] if paper_header else [])
  out = [f"## {title}", ""] + ([note, ""] if note else [])
  out += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  return out + body + [""]


def _paper_header(config, method, comparable) -> Optional[str]:
  if config is None or method is None:
    return None
  return f"paper ({method})" if comparable else NOT_COMPARABLE


def _reference(module_name: str) -> dict:
  """`paper_reference` of an evaluator module ({method: {metric: percent}}), {} if none."""
  import importlib  # pylint: disable=g-import-not-at-top

  try:
    module = importlib.import_module(f"bits_jax.evaluate.{module_name}")
  except ImportError:
    return {}
  reference = getattr(module, "paper_reference", {})
  return reference if isinstance(reference, dict) else {}


def markdown_report(results: dict[str, Any], config=None) -> str:
  """results.md: the paper's tables (see the module docstring), then all metrics."""
  names = _eval_names(config, results)
  method = paper_method(config) if config is not None else None
  comparable = config is not None and matches_paper(config)
  dataset = str(config.input.dataset) if config is not None else str(results.get("dataset", ""))
  base = _base_dataset(dataset)
  transfer_probe = any(k.startswith("init_from/") for k in results)
  lines = ["# Evaluation", ""]
  lines += [
      f"- {key}: {results[key]}"
      for key in ("weights", "which", "method", "dataset", "step")
      if key in results
  ]
  if config is not None:
    answer = "yes" if comparable else "no"
    lines.append(f"- the paper's setting (ImageNet-1k, ViT-B/16, 100 epochs): {answer}")
    if method:
      lines.append(f"- paper columns: the paper's {method} row")
  lines.append("")
  lookup = _Lookup(results, names, _GROUPS + _GROUPS_RANDOM)
  knn = lookup.metric("knn", r"knn_top1_k20") or lookup.metric("knn", r"knn_top1_k\d+")
  knn_label = f"k-NN top-1 (k={knn.rsplit('k', 1)[1]})" if knn else ""

  def paper(table, method, i):
    return table.get(method, (None,) * (i + 1))[i] if method else None

  in100 = _imagenet100_entries(config) if base == "imagenet2012" else []
  if in100:  # Retrieval restricted to ImageNet100: a Tab. 5 column, not Tab. 1's.
    others = [n for n in names.get("retrieval", ()) if n not in in100]
    in100_lookup = _Lookup(results, dict(names, retrieval=in100), _GROUPS + _GROUPS_RANDOM)
    # "-" matches no key (an empty list would fall back to the entry named "retrieval").
    lookup = _Lookup(results, dict(names, retrieval=others or ["-"]), _GROUPS + _GROUPS_RANDOM)
    lines += _tab5("ImageNet100", in100_lookup, config)
  tab5 = _TAB5_DATASETS.get(base)
  if tab5:
    lines += _tab5(tab5, lookup, config)
  elif transfer_probe:
    lines += _table(
        f"Tab. 8: transfer to {dataset}",
        "Frozen: the loaded weights before continued SSL; ours: after it. PAPER.md gives "
        "no Tab. 8 numbers.",
        [
            ("mAP@ALL", "retrieval", "map_all", _percent, None),
            (knn_label, "knn", knn, _percent, None),
            ("linear top-1", "linear", "linear_top1", _percent, None),
            ("MLP top-1", "linear", "mlp_top1", _percent, None),
        ],
        lookup,
    )
  else:
    lines += _table(
        f"Tab. 1: retrieval, k-NN, linear probe ({dataset})",
        "mAP@ALL on the continuous backbone features, top-1 accuracies; in %.",
        [
            ("mAP@ALL", "retrieval", "map_all", _percent, paper(PAPER_TAB1, method, 0)),
            (knn_label, "knn", knn, _percent, paper(PAPER_TAB1, method, 1)),
            ("linear top-1", "linear", "linear_top1", _percent, paper(PAPER_TAB1, method, 2)),
            ("MLP top-1", "linear", "mlp_top1", _percent, None),
        ],
        lookup,
        _paper_header(config, method, comparable),
    )
  lines += _table(
      "Tab. 2: representation geometry",
      "Eigenvalues of the backbone-feature covariance: d_eff = (sum l)^2 / sum l^2, "
      "r_eff = exp(entropy of l / sum l).",
      [
          ("d_eff", "geometry", "d_eff", _plain(1), paper(PAPER_TAB2, method, 0)),
          ("r_eff", "geometry", "r_eff", _plain(1), paper(PAPER_TAB2, method, 1)),
      ],
      lookup,
      None if tab5 or transfer_probe else _paper_header(config, method, comparable),
  )
  code_rows = [
      ("marginal bit entropy", "codes", "bit_entropy_mean", _plain(3), "bit_entropy_mean"),
      ("8-bit block entropy", "codes", "block_entropy_mean", _plain(3), "block_entropy_mean"),
      ("random 8-bit group entropy", "codes", "random_group_entropy_mean", _plain(3), None),
  ]
  lengths = {int(m.group(1)) for k in results for m in [_CODE_MAP.search(k)] if m}
  for n in sorted(lengths, reverse=True):
    code_rows += [
        (f"Hamming mAP@ALL, {n} bits", "retrieval", f"codes/{n}/map_all", _percent, f"map_all@{n}"),
        (f"Hamming mAP@ALL, random {n}", "retrieval", f"codes/random{n}/map_all", _percent, None),
        (f"asymmetric mAP@ALL, {n} bits", "retrieval", f"asym/{n}/map_all", _percent, None),
    ]
  sec55_header = None
  if config is not None and not tab5 and not transfer_probe:
    sec55_header = "paper (Sec. 5.5)" if comparable else NOT_COMPARABLE
  lines += _table(
      "Sec. 5.5: the codes as a language",
      "Entropies in bits (of 1 per bit, of 8 per block); mAP in %.",
      [(l, k, m, f, PAPER_SEC55.get(p) if p else None) for l, k, m, f, p in code_rows],
      lookup,
      sec55_header,
  )
  lines += _reference_table(
      "Tab. 6: MaskCut, COCO val2017 (class-agnostic)",
      "maskcut",
      [
          (f"{kind} {ap}", f"{kind}/{ap}")
          for kind in ("box", "mask")
          for ap in ("AP50", "AP75", "AP")
      ],
      lookup,
      config,
      method,
  )
  lines += _reference_table(
      "Tab. 7: DAVIS-2017 video object segmentation",
      "video",
      [("J&F", "JF_mean"), ("J", "J_mean"), ("F", "F_mean")],
      lookup,
      config,
      method,
      kind="davis",
  )
  lines += ["## All metrics", "", "| metric | value |", "| --- | --- |"]
  for key, value in results.items():
    text = f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)
    lines.append(f"| {key} | {text} |")
  return "\n".join(lines) + "\n"


def _imagenet100_entries(config) -> list[str]:
  """Names of the retrieval entries whose query split file or class list is ImageNet100's."""
  if config is None or "evals" not in config:
    return []
  return [
      name
      for name, e in config.evals.items()
      if e.get("type", name) == "retrieval"
      and "imagenet100"
      in (str(e.get("query_split_file", "")) + str(e.get("query_classes_file", ""))).lower()
  ]


def _tab5(column: str, lookup, config) -> list[str]:
  header = _paper_header(config, "BITS-reset", config is not None and is_vit_b16(config))
  return _table(
      f"Tab. 5: transfer retrieval, {column}",
      "Retrieval mAP@ALL (%) on the continuous backbone features.",
      [("mAP@ALL", "retrieval", "map_all", _percent, PAPER_TAB5[column])],
      lookup,
      header,
  )


def _reference_table(title, module, rows, lookup, config, method, kind=None) -> list[str]:
  """A section whose paper values come from an evaluator module's `paper_reference`."""
  reference = _reference(module).get(method, {}) if method else {}
  # Tab. 6 and 7 evaluate the pre-trained model on their own data: the run's config decides.
  comparable = config is not None and matches_paper(config)
  header = _paper_header(config, method, comparable) if reference else None
  return _table(
      title,
      "In %.",
      [(label, kind or module, metric, _percent, reference.get(metric)) for label, metric in rows],
      lookup,
      header,
  )
