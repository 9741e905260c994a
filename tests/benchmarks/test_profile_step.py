"""benchmarks/profile_step.py: summing a trace's XLA:CPU operations, and the tables."""

import os
import sys

import pytest

import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "benchmarks"))
import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position

xplane_pb2 = pytest.importorskip("tensorflow.tsl.profiler.protobuf.xplane_pb2")


def _space(lines: dict) -> "xplane_pb2.XSpace":
  """An XSpace whose host plane has `lines: {line name: [(event name, milliseconds)]}`."""
  space = xplane_pb2.XSpace()
  plane = space.planes.add(name="/host:CPU")
  ids = {}
  for line_name, events in lines.items():
    line = plane.lines.add(name=line_name)
    for name, millis in events:
      if name not in ids:
        ids[name] = len(ids) + 1
        plane.event_metadata[ids[name]].id = ids[name]
        plane.event_metadata[ids[name]].name = name
      line.events.add(metadata_id=ids[name], duration_ps=int(millis * 1e9))
  space.planes.add(name="/host:metadata")
  return space


def test_summary_sums_xla_operations_by_kind_and_skips_bookkeeping():
  space = _space({
      "tf_XLAEigen/1": [
          ("dot.1", 300),
          ("ThreadpoolListener::Record", 50),
          ("copy_bitcast_fusion.12", 100),
          ("end: copy_bitcast_fusion.12", 5),
      ],
      "tf_XLAEigen/2": [("dot.1", 300), ("wrapped_reduce-window.3", 100), ("triangular_solve", 20)],
      "tf_XLAPjRtCpuClient/7": [("ThunkExecutor::Execute", 900), ("multiply_add_fusion.2", 80)],
      "python": [("dot.9", 1000)],
  })
  profile = profile_step.summarize_xspace(space, steps=2)
  assert profile.threads == 2
  assert profile.by_kind == pytest.approx({
      "dot": 600e-3,
      "copy_bitcast_fusion": 100e-3,
      "wrapped_reduce-window": 100e-3,
      "triangular_solve": 20e-3,
      "multiply_add_fusion": 80e-3,
  })
  assert profile.count_by_kind["dot"] == 2
  assert profile.by_op["dot.1"] == pytest.approx(600e-3)
  text = profile_step.tables(profile, wall_seconds=1.0, top=3, matmul_seconds=0.25)
  assert "| matmuls | 300.0 | 66.7% |" in text  # 600 of 900 ms over 2 steps
  assert "| layout copies | 50.0 | 11.1% |" in text
  assert "| linear algebra | 10.0 | 2.2% |" in text
  assert "| `dot` | 300.0 | 66.7% | 1 |" in text
  assert "| `dot.1` | 300.00 | 66.7% |" in text
  assert "wall 1000.0 ms per step; traced operation time 450.0 ms per step" in text
  assert "at the matmul peak: 250.0 ms" in text


@pytest.mark.parametrize(
    "kind, family",
    [
        ("dot", "matmuls"),
        ("dot_general", "matmuls"),
        ("wrapped_dot", "matmuls"),
        ("ynn_fusion", "matmuls"),
        ("conv_general_dilated", "matmuls"),
        ("multiply_value_fusion", "other fusions"),
        ("convert_copy_fusion", "other fusions"),
        ("wrapped_reduce-window", "reductions"),
        ("transpose_copy_fusion", "layout copies"),
        ("copy", "layout copies"),
        ("triangular_solve", "linear algebra"),
        ("negate_exponential_fusion", "other fusions"),
    ],
)
def test_families(kind, family):
  assert profile_step.family(kind) == family
  assert profile_step.op_kind(kind + ".12") == kind


def test_a_trace_without_xla_cpu_operations_says_where_to_look():
  with pytest.raises(ValueError, match="device"):
    profile_step.summarize_xspace(_space({"python": [("f", 1)]}), steps=1)
