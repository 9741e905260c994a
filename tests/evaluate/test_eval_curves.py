"""Fig. 4 curves survive a resume: TensorBoard files of two runs in one workdir, read back."""

import time

from clu import metric_writers

from bits_jax.evaluate import curves
from bits_jax.evaluate import plots


def test_curves_of_a_resumed_run_keep_history_and_last_values(tmp_path):
  logdir = str(tmp_path)
  # First run: evaluated at steps 10, 20, 30; checkpointed at 20, interrupted after 30.
  writer = metric_writers.create_default_writer(logdir)
  for step, value in ((10, 0.1), (20, 0.2), (30, 0.3)):
    writer.write_scalars(step, {"eval/retrieval/map_all": value, "loss": 1.0})
  writer.close()
  time.sleep(1.1)  # Event file names carry the second they were opened.
  # Resumed from step 20: steps 30 and 40 evaluated again, in a second event file.
  writer = metric_writers.create_default_writer(logdir)
  for step, value in ((30, 0.35), (40, 0.4)):
    writer.write_scalars(step, {"eval/retrieval/map_all": value})
  writer.close()
  got = curves.read_scalars(logdir)
  assert set(got) == {"eval/retrieval/map_all"}
  steps, values = zip(*got["eval/retrieval/map_all"])
  assert steps == (10, 20, 30, 40)
  assert [round(v, 6) for v in values] == [0.1, 0.2, 0.35, 0.4]
  assert curves.read_scalars(logdir, prefix="loss")["loss"] == [(10, 1.0), (20, 1.0), (30, 1.0)]
  path = plots.plot_training_curves(got, str(tmp_path / "curves.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
