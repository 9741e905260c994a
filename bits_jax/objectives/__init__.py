"""Self-supervised objectives; each module exposes the same interface:

  NAME: str
  make_head(config) -> flax.linen.Module          # projection head
  init_state(config) -> pytree                    # objective state (e.g. a DINO center)
  loss(student_out, teacher_out, state, *, step, config) -> (loss, (new_state, metrics))

with `student_out: [V, batch, dim]` (global views first) and `teacher_out: [G, batch, dim]`.
Adding a method is one new module plus a line in `_REGISTRY`.
"""
import importlib

_REGISTRY = {
    "bits": "bits_jax.objectives.bits",
    "dino": "bits_jax.objectives.dino",
    "simdino": "bits_jax.objectives.simdino",
}


def get_objective(name: str):
  """The objective module registered under `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown method {name!r}: set config.method to one of "
                     f"{sorted(_REGISTRY)}.")
  return importlib.import_module(_REGISTRY[name])
