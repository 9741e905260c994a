"""Packaging: every imported distribution declared, one version, license and citation."""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

from packaging import requirements

import bits_jax

REPO = pathlib.Path(__file__).resolve().parent.parent
_OWN = {"bits_jax", "configs"}


def _setup_cfg() -> configparser.ConfigParser:
  parser = configparser.ConfigParser()
  parser.read(REPO / "setup.cfg")
  return parser


def _names(block: str) -> set[str]:
  """Normalized distribution names of a requirements block."""
  return {
      _normalize(requirements.Requirement(line).name)
      for line in block.splitlines()
      if line.strip() and not line.strip().startswith("#")
  }


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
  """(top-level module, imported at module import time) for each absolute import."""
  found = []

  def visit(node, in_function):
    if isinstance(node, ast.Import):
      found.extend((alias.name.split(".")[0], not in_function) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      found.append((node.module.split(".")[0], not in_function))
    in_function = in_function or isinstance(
        node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    )
    for child in ast.iter_child_nodes(node):
      visit(child, in_function)

  visit(ast.parse(path.read_text()), False)
  return found


def test_every_imported_distribution_is_declared():
  cfg = _setup_cfg()
  required = _names(cfg["options"]["install_requires"])
  optional = set().union(*(_names(block) for block in cfg["options.extras_require"].values()))
  distributions = importlib.metadata.packages_distributions()
  problems = []
  for path in sorted((REPO / "bits_jax").rglob("*.py")):
    for module, at_import in _imports(path):
      if module in sys.stdlib_module_names or module in _OWN:
        continue
      dists = {_normalize(d) for d in distributions.get(module, [module])}
      where = path.relative_to(REPO)
      if at_import and not dists & required:
        problems.append(
            f"{where} imports {module} ({sorted(dists)}) at module level: add it "
            "to install_requires in setup.cfg, or import it inside the function "
            "that needs it and list it in an extra."
        )
      elif not dists & (required | optional):
        problems.append(
            f"{where} imports {module} ({sorted(dists)}): declare it in "
            "setup.cfg (install_requires or an extra)."
        )
  assert not problems, "\n".join(problems)


def test_torch_is_optional_for_tests_and_package():
  cfg = _setup_cfg()
  assert "torch" not in _names(cfg["options"]["install_requires"])
  assert "torch" not in _names(cfg["options.extras_require"]["test"])
  assert "torch" in _names(cfg["options.extras_require"]["torch"])


def test_one_version_for_package_metadata_and_citation():
  version = _setup_cfg()["metadata"]["version"]
  assert bits_jax.__version__ in (version, importlib.metadata.version("bits_jax"))
  citation = (REPO / "CITATION.cff").read_text()
  assert re.search(
      rf"^version: {re.escape(version)}$", citation, re.M
  ), f"CITATION.cff's version differs from setup.cfg's {version}"
  assert "arXiv:2602.09764" in citation


def test_license_file_is_the_declared_license():
  assert _setup_cfg()["metadata"]["license"] == "Apache-2.0"
  text = (REPO / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
