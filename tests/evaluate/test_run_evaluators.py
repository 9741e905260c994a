"""run_evaluators: every entry, or the named ones; unconfigured data is skipped only when unnamed."""

import ml_collections
import pytest

from bits_jax.evaluate import common


@common.register("test_needs_data")
def _needs_data(ctx, data_dir=None):
  del ctx
  if not data_dir:
    raise common.MissingData("set data_dir")
  return {"score": 1.0}


def _evals(**data_dirs):
  return ml_collections.ConfigDict({
      name: dict(type="test_needs_data", every=0, at_end=False, data_dir=data_dir)
      for name, data_dir in data_dirs.items()
  })


def test_unconfigured_entries_are_skipped_when_running_all(capsys):
  results = common.run_evaluators(None, _evals(a="/data", b=""))
  assert results == {"a/score": 1.0}
  assert "evals.b: skipped (set data_dir)" in capsys.readouterr().out


def test_a_named_unconfigured_entry_raises():
  with pytest.raises(common.MissingData, match="set data_dir"):
    common.run_evaluators(None, _evals(a="/data", b=""), names=["b"])
