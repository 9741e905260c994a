"""Config validation, before anything is built or compiled, and the config check on resume.

`validate_config(config)` raises one `ConfigError` that lists every problem, each naming the
key and the fix. The known keys, their types and defaults are read from
`config_defaults.base_config()` at call time, and method / model / dataset names are checked
by the objectives registry, the model builder and the data sources, so a new key, method or
backbone needs no change here. An objective module may add its own checks with an optional
`config_problems(config) -> list[str]`.

`check_resume_config(stored, config)` compares the config of a resumed run with the one
saved in the workdir (`config.json`): a difference in a key that changes the training is
refused unless the key is listed in `config.allow_config_change` ('*' allows any);
`RESUME_SAFE_KEYS` (logging, checkpointing, evaluation, input threads, fault policy) may
always change.
"""
from __future__ import annotations

import difflib
import json
import numbers
import os
from typing import Any

import ml_collections

# Keys that change neither the training trajectory nor the checkpoint: they may differ on
# resume without being allowed explicitly.
RESUME_SAFE_KEYS = (
    "log_every", "checkpoint_every", "keep_checkpoints",
    "knn_eval", "knn_ks", "knn_temperature", "eval_batch_size", "test_split", "bank_split",
    "eval_resize_size", "eval_crop_size", "data_threads", "prefetch_batches", "data_dir",
    "idx_dir", "on_nonfinite", "max_consecutive_nonfinite", "allow_config_change",
    # Device layout: checkpoints restore onto any mesh (sharding-aware restore).
    "mesh", "partition_rules", "fsdp_min_size", "remat",
)
_NONFINITE_POLICIES = ("skip", "stop")
_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """An invalid config, or a config change refused on resume."""


def _base_config() -> ml_collections.ConfigDict:
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top
  return config_defaults.base_config()


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
  return (f"config.{key}={value!r} is a {type(value).__name__}; it must be {want} like its "
          f"default {default!r} (bits_jax/config_defaults.py).")


def _unknown_key_problem(key: str, known) -> str:
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  hint = (f"did you mean '{close[0]}'?" if close else
          "remove it, or add it with a default and a one-line doc to "
          "bits_jax/config_defaults.py.")
  return f"unknown key config.{key}: {hint}"


class _Checker:
  """Collects problems; value checks skip keys whose type is already wrong."""

  def __init__(self, config, bad_keys):
    self.config = config
    self.bad = set(bad_keys)
    self.problems: list[str] = []

  def ok(self, *keys) -> bool:
    """Whether every key is present, of the right type and not None."""
    return all(k in self.config and k not in self.bad and self.config[k] is not None
               for k in keys)

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
  c.positive("bits", "the number of bits in each message; the paper uses 256")
  for key in ("total_steps", "batch_size", "eval_batch_size", "log_every", "checkpoint_every",
              "keep_checkpoints", "num_global_crops", "num_channels", "head_hidden_dim",
              "head_bottleneck_dim", "head_layers", "max_consecutive_nonfinite", "patch_size",
              "global_crop_size"):
    c.positive(key, "a count or size")
  for key in ("num_local_crops", "warmup_steps", "head_reinit_every", "weight_decay",
              "weight_decay_end", "grad_clip_norm", "bce_weight", "coding_rate_weight",
              "learning_rate", "min_learning_rate"):
    c.non_negative(key, "0 disables it" if key in ("head_reinit_every", "grad_clip_norm")
                   else "a count, weight or rate")
  c.positive("coding_rate_eps", "the distortion in the coding rate, e.g. 0.05")
  c.within("teacher_momentum", 0.0, 1.0, "the EMA momentum of the teacher, e.g. 0.996")
  c.within("adam_b1", 0.0, 0.999999, "an Adam decay rate below 1")
  c.within("adam_b2", 0.0, 0.999999, "an Adam decay rate below 1")
  if c.ok("num_local_crops") and cfg.num_local_crops > 0:
    c.positive("local_crop_size", "the side of the local crops")
  if c.ok("warmup_steps", "total_steps") and cfg.warmup_steps > cfg.total_steps:
    c.add(f"config.warmup_steps={cfg.warmup_steps} is longer than config.total_steps="
          f"{cfg.total_steps}: the learning rate would never leave warm-up; use a "
          f"warmup_steps below total_steps (e.g. {max(cfg.total_steps // 10, 1)}).")
  if (c.ok("head_reinit_every", "total_steps") and cfg.head_reinit_every > 0 and
      cfg.head_reinit_every >= cfg.total_steps > 0):
    c.add(f"config.head_reinit_every={cfg.head_reinit_every} is not below config.total_steps="
          f"{cfg.total_steps}: the head would never be re-initialized; set "
          f"head_reinit_every=0 to turn re-initialization off, or a value below total_steps.")
  if (c.ok("min_learning_rate", "learning_rate") and
      cfg.min_learning_rate > cfg.learning_rate):
    c.add(f"config.min_learning_rate={cfg.min_learning_rate} is above config.learning_rate="
          f"{cfg.learning_rate} (the peak): lower min_learning_rate.")
  if c.ok("num_global_crops", "num_local_crops") and (
      cfg.num_global_crops + cfg.num_local_crops < 2):
    c.add("self-distillation needs at least two views: set num_global_crops=2, or "
          "num_local_crops > 0.")
  for key in ("global_crop_scale", "local_crop_scale"):
    if c.ok(key):
      scale = tuple(cfg[key])
      if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        c.add(f"config.{key}={scale} must be (low, high) with 0 < low <= high <= 1.")
  if c.ok("on_nonfinite") and cfg.on_nonfinite not in _NONFINITE_POLICIES:
    c.add(f"config.on_nonfinite={cfg.on_nonfinite!r}: use 'skip' (skip the update and count "
          f"it) or 'stop'.")
  if c.ok("dtype") and cfg.dtype not in _DTYPES:
    c.add(f"config.dtype={cfg.dtype!r}: use 'float32' or 'bfloat16'.")
    c.bad.add("dtype")  # the model builder would report it again
  if c.ok("knn_ks") and not all(
      isinstance(k, numbers.Integral) and k > 0 for k in cfg.knn_ks):
    c.add(f"config.knn_ks={tuple(cfg.knn_ks)} must be positive ints, e.g. (20,).")


def _check_method_and_model(c: _Checker) -> None:
  """Method from the objectives registry, backbone from the model builder, patch vs crops."""
  from bits_jax import models  # pylint: disable=g-import-not-at-top
  from bits_jax import objectives  # pylint: disable=g-import-not-at-top
  cfg = c.config
  if c.ok("method"):
    try:
      objective = objectives.get_objective(cfg.method)
    except ValueError as e:
      c.add(str(e))
    else:
      extra = getattr(objective, "config_problems", None)
      if extra is not None:
        c.problems.extend(extra(cfg))
  if not c.ok("model") or "dtype" in c.bad:
    return
  try:
    backbone = models.build_backbone(cfg)
  except (ValueError, KeyError, AttributeError) as e:
    c.add(str(e) if "config.model" in str(e) else f"config.model={cfg.model!r}: {e}")
    return
  patch = getattr(backbone, "patch_size", None)
  if patch is None or not c.ok("patch_size") or cfg.patch_size <= 0:
    return
  sizes = [("global_crop_size", cfg.get("global_crop_size", 0))]
  if cfg.get("num_local_crops", 0):
    sizes.append(("local_crop_size", cfg.get("local_crop_size", 0)))
  for key, size in sizes:
    if key in c.bad or size <= 0:
      continue
    if size < patch:
      c.add(f"config.{key}={size} is smaller than config.patch_size={patch}: a ViT needs at "
            f"least one patch; use a crop of at least {patch} (a multiple of {patch}) or a "
            f"smaller patch_size.")
    elif size % patch:
      c.add(f"config.{key}={size} is not a multiple of config.patch_size={patch}: use "
            f"{size - size % patch} or {size - size % patch + patch}.")


def _check_dataset(c: _Checker) -> None:
  from bits_jax.data import sources  # pylint: disable=g-import-not-at-top
  if not c.ok("dataset"):
    return
  try:
    kind, arg = sources.source_kind(c.config)
  except ValueError as e:
    c.add(str(e))
    return
  forms = "a TFDS name, 'npz:/path.npz', 'idx:/dir' or 'imagefolder:/dir'"
  if kind == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      tfds.builder_cls(arg)
    except Exception:  # pylint: disable=broad-except  # DatasetNotFoundError and friends
      close = difflib.get_close_matches(arg, tfds.list_builders(), n=1, cutoff=0.75)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      c.add(f"unknown dataset {arg!r}{hint}: set config.dataset to {forms}.")
  elif kind == "npz" and not os.path.isfile(arg):
    c.add(f"config.dataset={c.config.dataset!r}: file {arg} does not exist; use {forms}.")
  elif kind in ("idx", "imagefolder") and not os.path.isdir(arg):
    c.add(f"config.dataset={c.config.dataset!r}: directory {arg} does not exist; use {forms}.")


def _check_devices(c: _Checker, devices) -> None:
  """Mesh from config.mesh over the devices; the global batches split over it."""
  from bits_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  cfg = c.config
  try:
    mesh = sharding_lib.make_mesh(cfg, devices)
  except ValueError as e:
    c.add(str(e))
    return
  micro = cfg.get("grad_accum_steps", 1)
  for key in ("batch_size", "eval_batch_size"):
    if not c.ok(key) or cfg[key] <= 0 or (key == "batch_size" and (
        "grad_accum_steps" in c.bad or not isinstance(micro, int) or micro < 1)):
      continue
    try:
      sharding_lib.check_batch_divisible(
          cfg[key], mesh, key, **({"micro_batches": micro} if key == "batch_size" and
                                  micro != 1 else {}))
    except ValueError as e:
      c.add(str(e))


def config_problems(config, *, devices=None) -> list[str]:
  """Every problem of `config` (empty if none); `devices`: those of the mesh (default all)."""
  base = _base_config()
  problems = [_unknown_key_problem(k, list(base.keys())) for k in config.keys()
              if k not in base]
  bad_keys = set()
  for key in config.keys():
    if key in base:
      problem = _type_problem(key, config[key], base[key])
      if problem:
        problems.append(problem)
        bad_keys.add(key)
  checker = _Checker(config, bad_keys)
  _check_values(checker)
  _check_method_and_model(checker)
  _check_dataset(checker)
  _check_devices(checker, devices)
  return problems + checker.problems


def validate_config(config, *, devices=None) -> None:
  """Raises ConfigError listing every problem of `config`."""
  problems = config_problems(config, devices=devices)
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"Invalid config ({len(problems)} problem"
                      f"{'s' if len(problems) > 1 else ''}):\n{lines}")


# ---------------------------------------------------------------------------- resume


def _as_plain(config) -> dict:
  """The config as the JSON-compatible dict stored in the workdir."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def config_differences(stored: dict, config) -> dict[str, tuple[Any, Any]]:
  """{key: (stored value, current value)} for every top-level key that differs."""
  current = _as_plain(config)
  keys = sorted(set(stored) | set(current))
  missing = object()
  return {k: (stored.get(k, "<absent>"), current.get(k, "<absent>")) for k in keys
          if stored.get(k, missing) != current.get(k, missing)}


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
  refused = {k: v for k, v in differences.items()
             if k not in RESUME_SAFE_KEYS and "*" not in allowed and k not in allowed}
  if refused:
    lines = "\n".join(f"  - {k}: {old!r} in the workdir, {new!r} now"
                      for k, (old, new) in refused.items())
    keys = ",".join(refused)
    raise ConfigError(
        f"The config differs from the one this workdir was trained with (config.json):\n"
        f"{lines}\nResuming would silently change the run. Use the stored values, pass "
        f"--config.allow_config_change={keys} to accept these changes, or use a new "
        f"--workdir. Keys that may always change: {', '.join(RESUME_SAFE_KEYS)}.")
  return differences
