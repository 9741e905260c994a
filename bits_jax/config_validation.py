"""Config validation, before anything is built or compiled, and the config check on resume.

`validate_config(config)` raises one `ConfigError` that lists every problem, each naming the
(dotted) key and the fix. The known keys, their types and defaults are read from
`config_defaults.base_config()` at call time; `config.model` options come from the model
registry, `config.evals` entries from the evaluator registry (their keyword arguments from
the evaluator's signature), method / dataset names from the objective registry and the data
sources, and each objective adds its own checks (`Objective.config_problems`), so a new
key, method, backbone or evaluator needs no change here.

`check_resume_config(stored, config)` compares the config of a resumed run with the one
saved in the workdir (`config.json`): a difference in a key that changes the training is
refused unless the key is listed in `config.allow_config_change` ('*' allows any);
`RESUME_SAFE_KEYS` (logging, checkpointing, evaluation, input threads, fault policy) may
always change.
"""

from __future__ import annotations

import difflib
import inspect
import json
import numbers
from typing import Any

import ml_collections

# Keys that change neither the training trajectory nor the checkpoint: they may differ on
# resume without being allowed explicitly.
# Dotted keys, or prefixes ending in '.', of the whole section.
RESUME_SAFE_KEYS = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "baseline_random_init",
    "baseline_pixels",
    "profile_steps",
    "profile_first_step",
    "evals.",
    "input.eval_batch_size",
    "input.eval_resize_size",
    "input.eval_crop_size",
    "input.threads",
    "input.prefetch_batches",
    "input.data_dir",
    "input.idx_dir",
    "on_nonfinite",
    "max_consecutive_nonfinite",
    "allow_config_change",
    # Device layout: checkpoints restore onto any mesh (sharding-aware restore).
    "mesh.",
    "partition_rules",
    "fsdp_min_size",
    "model.remat",
    "log_term_grad_norms",  # extra metrics only
    "xla_cpu_ynn_fusion",  # how XLA:CPU fuses the dots, not what they compute
)
# Sections whose keys are not fixed by the defaults.
_OPEN_SECTIONS = ("model", "evals")
_NONFINITE_POLICIES = ("skip", "stop")
_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """An invalid config, or a config change refused on resume."""


def _base_config() -> ml_collections.ConfigDict:
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top

  return config_defaults.base_config()


def flat_items(config, prefix: str = ""):
  """(dotted key, value) of every leaf of a nested config or dict."""
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)) and value:
      yield from flat_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _type_problem(key: str, value: Any, default: Any) -> str | None:
  """Whether `value` has the type of `default`.

  None defaults take anything; None values pass here (some keys use None for "off" or
  "all") and fail the value checks of keys that need a number.
  """
  if default is None or value is None:
    return None
  if isinstance(default, bool):
    ok, want = isinstance(value, bool), "a bool (True/False)"
  elif isinstance(default, numbers.Integral):
    ok, want = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an int"
  elif isinstance(default, numbers.Real):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    want = "a number"
  elif isinstance(default, str):
    ok, want = isinstance(value, str), "a string"
  elif isinstance(default, (tuple, list)):
    ok, want = isinstance(value, (tuple, list)), "a tuple"
  elif isinstance(default, (dict, ml_collections.ConfigDict)):
    ok, want = isinstance(value, (dict, ml_collections.ConfigDict)), "a dict"
  else:
    return None
  if ok:
    return None
  return (
      f"config.{key}={value!r} is a {type(value).__name__}; it must be {want} like its "
      f"default {default!r} (bits_jax/config_defaults.py)."
  )


def _unknown_key_problem(key: str, known) -> str:
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  hint = (
      f"did you mean '{close[0]}'?"
      if close
      else "remove it, or add it with a default and a one-line doc to bits_jax/config_defaults.py."
  )
  return f"unknown key config.{key}: {hint}"


class _Checker:
  """Collects problems over the dotted keys; value checks skip keys whose type is wrong."""

  def __init__(self, config, bad_keys):
    self.config = dict(flat_items(config))
    self.nested = config
    self.bad = set(bad_keys)
    self.problems: list[str] = []

  def ok(self, *keys) -> bool:
    """Whether every key is present, of the right type and not None."""
    return all(k in self.config and k not in self.bad and self.config[k] is not None for k in keys)

  def _checkable(self, key: str) -> bool:
    return key in self.config and key not in self.bad

  def add(self, message: str) -> None:
    self.problems.append(message)

  def positive(self, key: str, what: str) -> None:
    value = self.config[key] if self._checkable(key) else 1
    if value is None or not value > 0:
      self.add(f"config.{key}={self.config[key]} must be positive ({what}).")

  def non_negative(self, key: str, what: str) -> None:
    value = self.config[key] if self._checkable(key) else 0
    if value is None or value < 0:
      self.add(f"config.{key}={self.config[key]} must be >= 0 ({what}).")

  def within(self, key: str, lo: float, hi: float, what: str) -> None:
    value = self.config[key] if self._checkable(key) else lo
    if value is None or not lo <= value <= hi:
      self.add(f"config.{key}={self.config[key]} must be in [{lo}, {hi}] ({what}).")


def _check_values(c: _Checker) -> None:
  """Impossible values and inconsistent schedule lengths."""
  cfg = c.config
  for key in (
      "total_steps",
      "input.batch_size",
      "input.eval_batch_size",
      "log_every",
      "checkpoint_every",
      "keep_checkpoints",
      "input.crops.num_global",
      "input.num_channels",
      "objective.head.hidden_dim",
      "objective.head.num_layers",
      "max_consecutive_nonfinite",
      "input.crops.global_size",
  ):
    c.positive(key, "a count or size")
  for key in (
      "input.crops.num_local",
      "optim.warmup_steps",
      "optim.weight_decay",
      "optim.weight_decay_end",
      "optim.clip_norm",
      "optim.learning_rate",
      "optim.end_learning_rate",
  ):
    c.non_negative(key, "0 disables it" if key == "optim.clip_norm" else "a count, weight or rate")
  c.non_negative("objective.head.bottleneck_dim", "0 = the paper's head, no bottleneck")
  _check_head_resets(c)
  c.within("optim.teacher_momentum", 0.0, 1.0, "the EMA momentum of the teacher, e.g. 0.996")
  c.within("optim.teacher_momentum_end", 0.0, 1.0, "the teacher's final EMA momentum, e.g. 1.0")
  c.within("optim.b1", 0.0, 0.999999, "an Adam decay rate below 1")
  c.within("optim.b2", 0.0, 0.999999, "an Adam decay rate below 1")
  c.positive("optim.grad_accum_steps", "micro-batches per update; 1 = none")
  if c.ok("input.crops.num_local") and cfg["input.crops.num_local"] > 0:
    c.positive("input.crops.local_size", "the side of the local crops")
  if c.ok("optim.warmup_steps", "total_steps") and (cfg["optim.warmup_steps"] > cfg["total_steps"]):
    c.add(
        f"config.optim.warmup_steps={cfg['optim.warmup_steps']} is longer than "
        f"config.total_steps={cfg['total_steps']}: the learning rate would never leave "
        "warm-up; use a warmup_steps below total_steps (e.g. "
        f"{max(cfg['total_steps'] // 10, 1)})."
    )
  if c.ok("optim.end_learning_rate", "optim.learning_rate") and (
      cfg["optim.end_learning_rate"] > cfg["optim.learning_rate"]
  ):
    c.add(
        f"config.optim.end_learning_rate={cfg['optim.end_learning_rate']} is above "
        f"config.optim.learning_rate={cfg['optim.learning_rate']} (the peak): lower "
        "end_learning_rate."
    )
  if c.ok("input.crops.num_global", "input.crops.num_local") and (
      cfg["input.crops.num_global"] + cfg["input.crops.num_local"] < 2
  ):
    c.add(
        "self-distillation needs at least two views: set input.crops.num_global=2, or "
        "input.crops.num_local > 0."
    )
  from bits_jax.data import augment  # pylint: disable=g-import-not-at-top

  for key in ("input.crops.global_scale", "input.crops.local_scale"):
    if c.ok(key):
      scale = tuple(cfg[key])
      if not augment.is_area_range(scale):
        c.add(f"config.{key}={scale} must be (low, high) with 0 < low <= high <= 1.")
  if c.ok("input.crops.global_view_scales", "input.crops.num_global"):
    try:
      augment.global_view_scales(c.nested.input.crops)
    except ValueError as e:
      c.add(str(e))
  if c.ok("input.augment.blur_probs") and len(tuple(cfg["input.augment.blur_probs"])) != 3:
    c.add(
        f"config.input.augment.blur_probs={tuple(cfg['input.augment.blur_probs'])} must be "
        "(first global view, other global views, local views)."
    )
  if c.ok("on_nonfinite") and cfg["on_nonfinite"] not in _NONFINITE_POLICIES:
    c.add(
        f"config.on_nonfinite={cfg['on_nonfinite']!r}: use 'skip' (skip the update and "
        "count it) or 'stop'."
    )
  from bits_jax import optim  # pylint: disable=g-import-not-at-top

  if c.ok("optim.clip_mode") and cfg["optim.clip_mode"] not in optim.CLIP_MODES:
    c.add(
        f"config.optim.clip_mode={cfg['optim.clip_mode']!r}: use 'per_tensor' (each gradient "
        "tensor clipped on its own, as DINO's code) or 'global' (their joint norm)."
    )
  if c.ok("init_from_head") and cfg["init_from_head"] not in ("reset", "keep"):
    c.add(
        f"config.init_from_head={cfg['init_from_head']!r}: use 'reset' (a fresh head) or "
        "'keep' (the init_from checkpoint's head)."
    )
  from bits_jax import weights  # pylint: disable=g-import-not-at-top

  unset = c.ok("init_from") and weights.unset_problem(str(cfg["init_from"]))
  if unset:
    c.add(unset)
  if c.ok("dtype") and cfg["dtype"] not in _DTYPES:
    c.add(f"config.dtype={cfg['dtype']!r}: use 'float32' or 'bfloat16'.")
    c.bad.add("dtype")  # the model builder would report it again


def _check_head_resets(c: _Checker) -> None:
  """`objective.head.reset_every_{steps,epochs}`: one of them, a reset that can happen."""
  cfg = c.config
  steps, epochs = "objective.head.reset_every_steps", "objective.head.reset_every_epochs"
  for key in (steps, epochs):
    c.non_negative(key, "0 = never")
  if not c.ok(steps, epochs) or cfg[steps] < 0 or cfg[epochs] < 0:
    return
  if cfg[steps] and cfg[epochs]:
    c.add(
        f"config.{steps}={cfg[steps]} and reset_every_epochs={cfg[epochs]} are both set: set "
        "one (the other to 0)."
    )
  elif c.ok("total_steps") and 0 < cfg[steps] and cfg[steps] >= cfg["total_steps"] > 0:
    c.add(
        f"config.{steps}={cfg[steps]} is not below config.total_steps={cfg['total_steps']}: "
        "the head would never be re-initialized; set it to 0 to turn re-initialization off, "
        "or a value below total_steps."
    )


def _check_objective(c: _Checker) -> None:
  """The method from the objective registry, then the objective's own checks."""
  from bits_jax import objectives  # pylint: disable=g-import-not-at-top

  if not c.ok("objective.name"):
    return
  try:
    objective = objectives.get(c.config["objective.name"])
  except ValueError as e:
    c.add(str(e))
    return
  # The objective's checks read its own section and top-level loop keys (e.g. total_steps):
  # with one of those of the wrong type, only the type problem is reported.
  section = c.config["objective.name"]
  if not any(k in c.bad for k in c.config if k.startswith(f"objective.{section}.") or "." not in k):
    c.problems.extend(objective.config_problems(c.nested))


def _check_model(c: _Checker) -> None:
  """Backbone and its options from the model registry, patch size vs crops."""
  from bits_jax import models  # pylint: disable=g-import-not-at-top

  if (
      not c.ok("model.name")
      or "dtype" in c.bad
      or any(k in c.bad for k in ("input.crops.global_size", "input.num_channels"))
  ):
    return
  try:
    backbone = models.build_backbone(c.nested)
  except (ValueError, KeyError, AttributeError) as e:
    c.add(
        str(e) if "config.model" in str(e) else f"config.model.name={c.config['model.name']!r}: {e}"
    )
    return
  patch = getattr(backbone, "patch_size", None)
  if not isinstance(patch, int) or patch <= 0:
    return
  sizes = [("input.crops.global_size", c.config.get("input.crops.global_size", 0))]
  if c.config.get("input.crops.num_local", 0):
    sizes.append(("input.crops.local_size", c.config.get("input.crops.local_size", 0)))
  for key, size in sizes:
    if key in c.bad or not isinstance(size, int) or size <= 0:
      continue
    if size < patch:
      c.add(
          f"config.{key}={size} is smaller than config.model.patch_size={patch}: a ViT "
          f"needs at least one patch; use a crop of at least {patch} (a multiple of "
          f"{patch}) or a smaller patch_size."
      )
    elif size % patch:
      c.add(
          f"config.{key}={size} is not a multiple of config.model.patch_size={patch}: use "
          f"{size - size % patch} or {size - size % patch + patch}."
      )


def _check_evals(c: _Checker) -> None:
  """Every config.evals entry: a registered type, `every`/`at_end`, known keyword arguments."""
  from bits_jax.evaluate import common  # pylint: disable=g-import-not-at-top

  for name, entry in c.nested.evals.items():
    if not isinstance(entry, (ml_collections.ConfigDict, dict)) or "type" not in entry:
      c.add(f"config.evals.{name} must be a dict with a 'type' (an evaluator: e.g. 'knn').")
      continue
    try:
      fn = common.get(entry["type"])
    except ValueError as e:
      c.add(f"config.evals.{name}.type: {e}")
      continue
    every = entry.get("every", 0)
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
      c.add(
          f"config.evals.{name}.every={every!r} must be an int >= 0 (steps between runs "
          "during training; 0 = not during training)."
      )
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
      continue
    known = [p for p in params if p != "ctx"]
    for key in entry:
      if key not in ("type", "every", "at_end") and key not in known:
        c.add(
            f"config.evals.{name}.{key} is not an option of the {entry['type']!r} "
            f"evaluator: use {known}."
        )


def _check_dataset(c: _Checker) -> None:
  from bits_jax.data import sources  # pylint: disable=g-import-not-at-top

  if not c.ok("input.dataset"):
    return
  problem = sources.check(c.nested.input)
  if problem:
    c.add(problem)


def _check_devices(c: _Checker, devices) -> None:
  """Mesh from config.mesh over the devices; the global batches split over it."""
  from bits_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  cfg = c.config
  try:
    mesh = sharding_lib.make_mesh(c.nested, devices)
  except ValueError as e:
    c.add(str(e))
    return
  micro = cfg.get("optim.grad_accum_steps", 1)
  for key in ("input.batch_size", "input.eval_batch_size"):
    if (
        not c.ok(key)
        or cfg[key] <= 0
        or (
            key == "input.batch_size"
            and ("optim.grad_accum_steps" in c.bad or not isinstance(micro, int) or micro < 1)
        )
    ):
      continue
    try:
      sharding_lib.check_batch_divisible(
          cfg[key],
          mesh,
          key,
          **({"micro_batches": micro} if key == "input.batch_size" and micro != 1 else {}),
      )
    except ValueError as e:
      c.add(str(e))


def config_problems(config, *, devices=None) -> list[str]:
  """Every problem of `config` (empty if none); `devices`: those of the mesh (default all)."""
  base = dict(flat_items(_base_config()))
  problems, bad_keys = [], set()
  for key, value in flat_items(config):
    if key.split(".")[0] in _OPEN_SECTIONS and key not in base:
      continue  # checked by the model / evaluator registries
    if key not in base:
      problems.append(_unknown_key_problem(key, list(base)))
      continue
    problem = _type_problem(key, value, base[key])
    if problem:
      problems.append(problem)
      bad_keys.add(key)
  checker = _Checker(config, bad_keys)
  _check_values(checker)
  _check_objective(checker)
  _check_model(checker)
  _check_evals(checker)
  _check_dataset(checker)
  _check_devices(checker, devices)
  return problems + checker.problems


def validate_config(config, *, devices=None) -> None:
  """Raises ConfigError listing every problem of `config`."""
  problems = config_problems(config, devices=devices)
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(
        f"Invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{lines}"
    )


# ---------------------------------------------------------------------------- resume


def _as_plain(config) -> dict:
  """The config as the JSON-compatible dict stored in the workdir."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def config_differences(stored: dict, config) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (stored value, current value)} for every leaf that differs.

  A key the stored config lacks (an option added to the code since the run was written)
  counts as its default (`config_defaults.complete`).
  """
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top

  completed = config_defaults.complete(ml_collections.ConfigDict(stored))
  completed = dict(flat_items(_as_plain(completed)))
  stored, current = dict(flat_items(stored)), dict(flat_items(_as_plain(config)))
  missing = object()
  differences = {}
  for k in sorted(set(stored) | set(current)):
    if completed.get(k, missing) != current.get(k, missing):
      differences[k] = (stored.get(k, "<absent>"), current.get(k, "<absent>"))
  return differences


def _resume_safe(key: str) -> bool:
  return any(
      key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS
  )


def allowed_changes(config) -> set[str]:
  raw = config.get("allow_config_change", "") or ""
  return {k.strip() for k in raw.split(",") if k.strip()}


def check_resume_config(stored: dict, config) -> dict[str, tuple[Any, Any]]:
  """Refuses a resume whose config differs from `stored` in a key that is not allowed.

  Returns the allowed differences (to be logged). Raises ConfigError listing the refused
  ones with both values and how to allow them.
  """
  differences = config_differences(stored, config)
  allowed = allowed_changes(config)
  refused = {
      k: v
      for k, v in differences.items()
      if not _resume_safe(k) and "*" not in allowed and k not in allowed
  }
  if refused:
    lines = "\n".join(
        f"  - {k}: {old!r} in the workdir, {new!r} now" for k, (old, new) in refused.items()
    )
    keys = ",".join(refused)
    raise ConfigError(
        "The config differs from the one this workdir was trained with (config.json):\n"
        f"{lines}\nResuming would silently change the run. Use the stored values, pass "
        f"--config.allow_config_change={keys} to accept these changes, or use a new "
        f"--workdir. Keys that may always change: {', '.join(RESUME_SAFE_KEYS)}."
    )
  return differences
