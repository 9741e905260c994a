"""The public loading API: `bits_jax.load_backbone(path) -> (apply_fn, params, config)`.

  apply_fn, params, config = bits_jax.load_backbone("workdirs/fashion_mnist_bits")
  features = apply_fn(params, images)  # images: [n, H, W, C] float32, normalised
                                       # as the training pipeline does -> [n, D]

`path` is anything `bits_jax.weights` resolves (any etils.epath path, gs:// included): a
run's workdir, its `checkpoints/` directory, one checkpoint step directory, or converted
weights (`python -m bits_jax.tools.convert`). The config is, in order: the `config`
argument (a ConfigDict or 'configs/x.py:preset'), the run's `config.json` (found in the
path or up to three directories above it), or the defaults with the model settings that
converted weights record in `convert_meta.json`.
"""

from __future__ import annotations

from typing import Any, Callable

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

# convert_meta.json keys -> config keys (as bits_jax.tools.convert.config_overrides).
_META_KEYS = {
    "model": ("model", "name"),
    "patch_size": ("model", "patch_size"),
    "global_crop_size": ("input", "crops", "global_size"),
    "resnet_width": ("model", "width"),
    "resnet_small_stem": ("model", "small_stem"),
    "num_channels": ("input", "num_channels"),
}


def find_stored_config(path: epath.PathLike) -> epath.Path | None:
  """The run's config.json in `path` or one of its three parents (step dir -> workdir)."""
  path = epath.Path(path)
  for directory in stored_config_dirs(path):
    candidate = directory / "config.json"
    if candidate.exists():
      return candidate
  return None


def stored_config_dirs(path: epath.PathLike) -> list[epath.Path]:
  """The directories `find_stored_config` looks in: `path` and up to three parents."""
  path = epath.Path(path)
  return [path, *list(path.parents)[:3]]


def _stored_config(path: epath.Path) -> ml_collections.ConfigDict | None:
  """The run's config.json in `path` or one of its three parents, as a ConfigDict."""
  from bits_jax.evaluate import run  # pylint: disable=g-import-not-at-top

  candidate = find_stored_config(path)
  return run.config_from_json(candidate.read_text()) if candidate else None


def _config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The defaults with the model and input settings of converted weights' meta.

  The model section is built from the meta alone: the defaults' model section is an example
  of one backbone (a ViT's patch_size), not options every backbone takes.
  """
  from bits_jax import config_defaults  # pylint: disable=g-import-not-at-top

  if "model" not in meta:
    raise ValueError(
        f"convert_meta.json {meta} names no model: pass config=ConfigDict or "
        "config='configs/NAME.py:PRESET'."
    )
  config = config_defaults.base_config()
  config.model = ml_collections.ConfigDict()
  for key, (*parents, leaf) in _META_KEYS.items():
    if key in meta:
      target = config
      for part in parents:
        target = target[part]
      with target.ignore_type():
        target[leaf] = meta[key]
  return config


def resolve_config(path: epath.PathLike, config=None) -> ml_collections.ConfigDict:
  """The config of the weights at `path` (see the module docstring for the order)."""
  from bits_jax import utils  # pylint: disable=g-import-not-at-top
  from bits_jax import weights  # pylint: disable=g-import-not-at-top

  if isinstance(config, str):
    return utils.load_config_file(config)
  if config is not None:
    return config
  stored = _stored_config(weights.absolute(path))
  if stored is not None:
    return stored
  meta = weights.read_meta(path)
  if not meta:
    raise ValueError(
        f"No config.json with the weights at {path} and no convert_meta.json: pass "
        "config=ConfigDict or config='configs/NAME.py:PRESET' (the config they were trained "
        "with)."
    )
  return _config_from_meta(meta)


def load_backbone(
    path: epath.PathLike, config=None, *, which: str = "teacher"
) -> tuple[ApplyFn, PyTree, ml_collections.ConfigDict]:
  """(apply_fn, params, config) of the backbone stored at `path`.

  Args:
    path: a workdir, a checkpoints/ or step directory, or converted weights (any epath).
    config: optional ConfigDict or 'configs/x.py:preset'; default: the run's config.json.
    which: 'teacher' (the EMA teacher, what the evaluation uses) or 'student'.

  Returns:
    apply_fn(params, images: [n, H, W, C] float32 normalised) -> features [n, D] float32
    (jitted; the backbone's 'cls' output, D = `bits_jax.models.feature_dim(config)`);
    params: {'backbone': ..., 'head'?: ..., 'batch_stats'?: {'backbone': ...}} as numpy
    ('head' is the projection head when the weights have one: BITS codes are
    `head.apply({'params': params['head']}, features) > 0`); config: the run's config.
  """
  from bits_jax import train_state  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import run  # pylint: disable=g-import-not-at-top

  config = resolve_config(path, config)
  components = train_state.build(config)
  params, _ = run.load_variables(config, components, path, which)
  backbone = components.backbone

  @jax.jit
  def apply_fn(params: PyTree, images: jax.Array) -> jax.Array:
    variables = train_state.backbone_variables(params, params.get("batch_stats"))
    out = backbone.apply(variables, images, train=False)
    return out["cls"].astype(jnp.float32)

  return apply_fn, params, config
