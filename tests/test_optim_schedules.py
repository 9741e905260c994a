"""The schedules of `optim.make_schedules`: the teacher momentum's cosine and its end value."""

import math

import numpy as np
import pytest

import helpers
from bits_jax import optim


@pytest.mark.parametrize("start,end", [(0.996, 1.0), (0.99, 0.999), (0.99, 0.99)])
def test_teacher_momentum_is_a_cosine_from_start_to_end(start, end):
  config = helpers.load_config("fashion_mnist", "test")
  config.total_steps = 100
  config.optim.teacher_momentum, config.optim.teacher_momentum_end = start, end
  momentum = optim.make_schedules(config).teacher_momentum
  for step in (0, 25, 50, 100):
    want = end - (end - start) * 0.5 * (1 + math.cos(math.pi * step / 100))
    np.testing.assert_allclose(float(momentum(step)), want, rtol=0, atol=1e-6)
