"""What experiment configs share: preset parsing (`parse_arg`) and recipe blocks.

  def get_config(arg=None):
    arg = common.parse_arg(arg, size=("demo", "test"), method=common.METHODS)
    ...

`parse_arg('test,dino')` and `parse_arg('size=test,method=dino')` both give
{'size': 'test', 'method': 'dino'}: a bare token picks the option whose choices contain it,
`key=value` sets any option (a tuple of choices: one of them; a default's type otherwise).
"""

import ml_collections

# Presets of the comparison: BITS-reset (the head re-initialised on the config's period),
# BITS-fixed (never reset), BITS-cosine (cosine agreement on the logits, paper Tab. 3, with
# resets), and the baselines, which keep their head.
METHODS = ("bits", "bits_fixed", "bits_cosine", "dino", "simdino")
_OBJECTIVE = {"bits_fixed": "bits", "bits_cosine": "bits"}


def parse_arg(arg, **options) -> ml_collections.ConfigDict:
  """The presets of a config file from its `:arg` string (see the module docstring).

  Args:
    arg: 'token,key=value,...' or None / ''.
    **options: name -> a tuple of choices (the first is the default) or a default value.
  """
  values = {k: v[0] if isinstance(v, tuple) else v for k, v in options.items()}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, sep, value = token.partition("=")
    if not sep:
      matches = [k for k, v in options.items() if isinstance(v, tuple) and token in v]
      if not matches:
        raise ValueError(f"Unknown preset {token!r}: use {_describe(options)}.")
      values[matches[0]] = token
      continue
    if key not in options:
      raise ValueError(f"Unknown preset option {key!r}: use {_describe(options)}.")
    choices = options[key]
    if isinstance(choices, tuple):
      if value not in choices:
        raise ValueError(f"Preset {key}={value!r}: use one of {choices}.")
    elif isinstance(choices, bool):
      value = value.lower() in ("1", "true", "yes")
    elif choices is not None:
      value = type(choices)(value)
    values[key] = value
  return ml_collections.ConfigDict(values)


def _describe(options) -> str:
  return ", ".join(
      f"{k} in {v}" if isinstance(v, tuple) else f"{k}=<{type(v).__name__}>"
      for k, v in options.items()
  )


def set_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """The objective of a METHODS preset; only 'bits' and 'bits_cosine' keep head resets."""
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}: use one of {METHODS}.")
  config.objective.name = _OBJECTIVE.get(method, method)
  if method == "bits_cosine":
    config.objective.bits.agreement = "cosine"
  if method not in ("bits", "bits_cosine"):
    config.objective.head.reset_every_steps = 0
    config.objective.head.reset_every_epochs = 0
  return config
