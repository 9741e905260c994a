"""The objective interface and what the objectives share.

An objective module defines `OBJECTIVE = Objective(...)`:

  make_head(config) -> nn.Module               the projection head
  init_state(config) -> pytree                 state between steps (a DINO center; {})
  loss(student_out, teacher_out, state, *, step, config, batch_shards=1)
      -> (loss, (new_state, metrics))
      student_out: [V, batch, dim] (the G global views first), teacher_out: [G, batch, dim];
      batch_shards: the devices the batch is split over (per-device statistics).
      metrics[LOSS_TERMS] (optional): {name: scalar} weighted terms summing to the loss; the
      train step logs the gradient norm of each (`grad_norm/<name>`) and drops the entry.
  frozen_params(config) -> FrozenParams | None  head params that must not move yet (DINO's
                                               prototypes); None by default
  config_problems(config) -> list[str]         impossible settings, each with its fix
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bits_jax import utils

PyTree = Any
LOSS_TERMS = "loss_terms"  # the metrics entry holding the loss's weighted terms


@dataclasses.dataclass(frozen=True)
class FrozenParams:
  """The head's sub-module `name`, fixed for the first `steps` steps (DINO's prototypes).

  While frozen, the train step zeroes its updates (weight decay included) and keeps its Adam
  state (moments and bias-correction count, a parameter group of its own) as it was, so its
  first update after the freeze is Adam's first step: what PyTorch's AdamW does for a
  parameter without gradient (DINO cancels the gradient after clipping, so it still counts in
  the clipping norm). A count shared with the rest of the head would instead meet near-zero
  moments with a spent bias correction and overshoot (3x the learning rate at the first step
  after a 5000-step freeze).
  """

  name: str
  steps: int

  def selects(self, path) -> bool:
    """Whether the params-tree key path is one of the frozen leaves."""
    return utils.under_key(path, "head") and utils.under_key(path, self.name)

  def mask(self, tree: PyTree, step) -> PyTree:
    """`tree` (params-shaped, e.g. updates) with the frozen leaves zeroed while `step < steps`."""
    frozen = jnp.asarray(step) < self.steps
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.where(frozen, jnp.zeros_like(x), x) if self.selects(path) else x,
        tree,
    )


def _nothing_frozen(config) -> FrozenParams | None:
  del config
  return None


def _no_problems(config) -> list[str]:
  del config
  return []


def _no_state(config) -> PyTree:
  del config
  return {}


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  make_head: Callable
  loss: Callable
  init_state: Callable = _no_state
  frozen_params: Callable[[Any], FrozenParams | None] = _nothing_frozen
  config_problems: Callable[[Any], list[str]] = _no_problems


def cross_view_pairs(
    num_teacher_views: int, num_student_views: int, method: str
) -> list[tuple[int, int]]:
  """(teacher view g, student view v) index pairs with v != g; an error if there are none."""
  pairs = [(g, v) for g in range(num_teacher_views) for v in range(num_student_views) if v != g]
  if not pairs:
    raise ValueError(
        f"{method} needs at least two views (two global crops, or one global "
        "crop and local crops): set config.input.crops.num_global=2 or "
        "config.input.crops.num_local > 0."
    )
  return pairs


def mean_over_pairs(fn: Callable[[int, int], jax.Array], pairs) -> jax.Array:
  """Mean of `fn(g, v)` over the (teacher, student) view pairs."""
  return jnp.mean(jnp.stack([fn(g, v) for g, v in pairs]))


def positive(config, section: str, keys, hint: str) -> list[str]:
  """Problems for the keys of `config.objective.<section>` that are not > 0."""
  values = config.objective[section]
  return [
      f"config.objective.{section}.{k}={values[k]} must be > 0 ({hint})."
      for k in keys
      if values[k] is None or not values[k] > 0
  ]


def one_of(config, section: str, choices: dict[str, tuple]) -> list[str]:
  """Problems for the keys of `config.objective.<section>` not among their `choices`."""
  values = config.objective[section]
  return [
      f"config.objective.{section}.{k}={values[k]!r}: use one of {options}."
      for k, options in choices.items()
      if values[k] not in options
  ]


def coding_rate_balance(n: int, d: int) -> float:
  """SimDINO's balancing factor (d + n) / (d n) of the coding rate of n vectors in R^d."""
  return (d + n) / (d * n)
