"""Curves of the evaluators run during training (Fig. 4), read back from TensorBoard files.

The train loop logs every periodic evaluator (`config.evals.<name>.every` > 0) as scalars
'eval/<name>/<metric>' in the workdir. A resumed run opens a new event file next to the old
ones, so the history survives a restart; the steps between the last checkpoint and the
interruption are trained, evaluated and logged again, and `read_scalars` keeps the value
written last for such a step. `plots.plot_training_curves(read_scalars(workdir), path)` draws
them (Fig. 4).
"""

from __future__ import annotations

import glob
import os

import numpy as np


def read_scalars(logdir: str, prefix: str = "eval/") -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)] sorted by step} of the scalars under `prefix` in `logdir`.

  Reads every `events.out.tfevents.*` file directly in `logdir`, in the order they were
  written (first event's wall time); a step logged again later replaces the earlier value.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  files = []
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    events = list(tf.compat.v1.train.summary_iterator(path))
    if events:
      files.append((events[0].wall_time, path, events))
  latest: dict[str, dict[int, tuple[float, float]]] = {}
  for _, _, events in sorted(files, key=lambda f: (f[0], f[1])):
    for event in events:
      for value in event.summary.value:
        if not value.tag.startswith(prefix):
          continue
        if value.HasField("tensor"):
          number = float(np.asarray(tf.make_ndarray(value.tensor)).reshape(-1)[0])
        else:
          number = float(value.simple_value)
        latest.setdefault(value.tag, {})[int(event.step)] = (event.wall_time, number)
  return {tag: [(s, v) for s, (_, v) in sorted(steps.items())] for tag, steps in latest.items()}
