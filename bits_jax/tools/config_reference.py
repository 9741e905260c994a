"""The config reference (every key, its default and meaning) generated from the defaults module.

  python -m bits_jax.tools.config_reference            # print the Markdown table
  python -m bits_jax.tools.config_reference --write=README.md

Meanings are the comments beside (or on the lines just above) each key in
`bits_jax/config_defaults.py`, so the defaults module stays the one place to document a key.
`--write` replaces the block between the README's `config-reference` markers; a test keeps
the README in sync.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize

from absl import app
from absl import flags

from bits_jax import config_defaults
from bits_jax import config_validation

BEGIN = "<!-- config-reference:begin (python -m bits_jax.tools.config_reference --write) -->"
END = "<!-- config-reference:end -->"

_WRITE = flags.DEFINE_string("write", None, "Markdown file whose reference block to replace.")


def _comments(source: str) -> dict[int, str]:
  """{line number: comment text} of every comment in `source`."""
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def _meaning(line: int, comments: dict[int, str], lines: list[str]) -> str:
  """The comment on `line`, else those on the comment-only lines just above it."""
  if line in comments and not lines[line - 1].lstrip().startswith("#"):
    return comments[line]
  above, i = [], line - 1
  while i in comments and lines[i - 1].lstrip().startswith("#"):
    above.insert(0, comments[i])
    i -= 1
  return " ".join(above)


def _keyword_lines(
    call: ast.AST, prefix: str, out: dict[str, tuple[int, ...]], parents: tuple[int, ...] = ()
) -> None:
  """Dotted key -> (its line, lines of its enclosing keywords) in `ConfigDict(dict(...))`s."""
  if not isinstance(call, ast.Call):
    return
  for arg in call.args:
    _keyword_lines(arg, prefix, out, parents)
  for keyword in call.keywords:
    value = keyword.value
    # A nested section is `ConfigDict(dict(...))`; other calls (e.g. `placeholder(str)`) are values.
    if (
        isinstance(value, ast.Call)
        and value.args
        and isinstance(value.func, ast.Name)
        and value.func.id in ("ConfigDict", "dict")
    ):
      _keyword_lines(keyword.value, f"{prefix}{keyword.arg}.", out, (keyword.lineno,) + parents)
    else:
      out[f"{prefix}{keyword.arg}"] = (keyword.lineno,) + parents


def key_lines() -> dict[str, tuple[int, ...]]:
  """Dotted key -> (its line, lines of the sections it is in) in config_defaults.py."""
  tree = ast.parse(inspect.getsource(config_defaults))
  functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
  out: dict[str, int] = {}
  for node in ast.walk(functions["base_config"]):
    if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)):
      continue
    key = node.targets[0].attr
    value = node.value
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and (value.func.id in functions)
    ):
      for inner in ast.walk(functions[value.func.id]):
        if isinstance(inner, ast.Return):
          _keyword_lines(inner.value, f"{key}.", out)
    elif isinstance(value, ast.Call) and value.args:
      _keyword_lines(value, f"{key}.", out)
    else:
      out[key] = (node.lineno,)
  return out


def reference_markdown() -> str:
  """The Markdown table of every default key (dotted), its default and its meaning."""
  source = inspect.getsource(config_defaults)
  comments, lines = _comments(source), source.splitlines()
  where = key_lines()
  rows = ["| key | default | meaning |", "| --- | --- | --- |"]
  for key, value in config_validation.flat_items(config_defaults.base_config()):
    # A key without a comment of its own takes its section's (e.g. an evaluator's kwargs).
    meaning = next(
        (m for m in (_meaning(line, comments, lines) for line in where.get(key, ())) if m), ""
    )
    rows.append(f"| `{key}` | `{value!r}` | {meaning.replace('|', '/')} |")
  return "\n".join(rows) + "\n"


def replace_block(text: str, table: str) -> str:
  """`text` with the block between BEGIN and END replaced by `table`."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"the file has no config-reference block: add the lines\n{BEGIN}\n{END}")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  table = reference_markdown()
  if not _WRITE.value:
    print(table, end="")
    return
  try:
    with open(_WRITE.value) as f:
      text = f.read()
    new_text = replace_block(text, table)
  except (OSError, ValueError) as e:
    raise app.UsageError(f"--write={_WRITE.value}: {e}") from e
  with open(_WRITE.value, "w") as f:
    f.write(new_text)


if __name__ == "__main__":
  app.run(main)
