"""The evaluator registry and the context every evaluator runs in.

An evaluator is one module with one entry point,

  @common.register("knn")
  def run(ctx: EvalContext, **kwargs) -> dict[str, Any]: ...

returning flat metrics (`{'top1_k20': 0.76, ...}`; floats, ints or strings). The same
function serves the train loop (`config.evals.<name>` with `every` > 0) and
`python -m bits_jax.evaluate` (every entry of `config.evals`). `kwargs` are the entry's keys
other than `type`, `every` and `prefix`.

The context (`EvalContext`, built by `bits_jax.evaluate.run`) offers:
  ctx.config       the run's ConfigDict (read only what kwargs cannot carry)
  ctx.mesh         the device mesh
  ctx.step         training step of the evaluated weights (int; 0 if unknown)
  ctx.out_dir      directory for figures (None: write no files)
  ctx.patch_size   backbone stride of `patch_tokens` (ViT patch size)
  ctx.num_classes  classes of the evaluation dataset
  ctx.features(split) -> {'cls': [n, D], 'cls_last4'?: [n, 4D], 'logits'?: [n, bits],
                          'label': [n] (int) or [n, classes] (multi-hot), 'mask': [n] bool,
                          'id': [n] str}
                   frozen features of a split of the evaluation dataset, cached per split
                   ('logits' only when the weights have a BITS head; mask=False on padding;
                   'id' the source's image ids: file name or TFDS id, image-folder relative
                   path, npz/IDX index; '' on padding)
  ctx.images(split, rows) -> uint8 [len(rows), S, S, C]
                   the evaluation views (resize + center crop) of feature rows `rows` of
                   `split`, for figures
  ctx.predict(images, outputs=('cls',)) -> {name: np.ndarray}
                   the frozen model on `images: [n, H, W, C]` float32, already normalised
                   (any n, any H, W divisible by the patch size); outputs among 'cls',
                   'cls_last4', 'patch_tokens' [n, h*w, D], 'logits' [n, bits],
                   'last_keys' [n, h*w, D] (keys of the last attention block, ViT only)
  ctx.predict_batch(images, outputs) -> {name: global jax.Array}
                   the same on one batch of this process's rows (rows divisible by the
                   local devices), e.g. an eval-stream batch
  ctx.gather(rows) -> np.ndarray
                   this process's rows of a batch -> the global batch's, in the row order
                   of predict_batch outputs (labels and masks of a stream batch)
  ctx.normalize(images_uint8) -> float32 images normalised as in training
  ctx.add_plot(path) registers a written PNG for TensorBoard
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax import utils
from bits_jax.models import vit as vit_lib

EvaluatorFn = Callable[..., dict[str, Any]]
_REGISTRY: dict[str, EvaluatorFn] = {}
# Evaluator modules import this one; `get` imports them all to fill the registry.
_MODULES = ("knn", "linear", "retrieval", "codes", "dense", "geometry", "video", "maskcut")


def register(name: str) -> Callable[[EvaluatorFn], EvaluatorFn]:
  """Decorator: registers `fn` as the evaluator `name` (the `type` of a config.evals entry)."""

  def add(fn: EvaluatorFn) -> EvaluatorFn:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"evaluator {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn

  return add


def get(name: str) -> EvaluatorFn:
  """The evaluator registered as `name`."""
  if name not in _REGISTRY:
    for module in _MODULES:
      try:
        importlib.import_module(f"bits_jax.evaluate.{module}")
      except ModuleNotFoundError as e:
        if e.name != f"bits_jax.evaluate.{module}":
          raise
  if name not in _REGISTRY:
    raise ValueError(f"Unknown evaluator type {name!r}: use one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name]


class EvalContext:
  """Frozen weights on a mesh, ready for evaluators (see the module docstring).

  Args:
    config: the run's config.
    components: `train_state.build(config)` (the backbone and head modules).
    variables: {'backbone': params, 'head'?: params, 'batch_stats'?: {'backbone': stats}}.
    mesh: the device mesh; images are split over it along the batch.
    step: training step of the weights.
    out_dir: where evaluators write figures (None: nowhere).
  """

  def __init__(
      self, config, components, variables, mesh, *, step: int = 0, out_dir: str | None = None
  ):
    self.config, self.mesh, self.step, self.out_dir = config, mesh, int(step or 0), out_dir
    self.plots: list[str] = []
    self._components = components
    self._variables = jax.device_put(variables, sharding_lib.replicated(mesh))
    self._batch_sharding = sharding_lib.batch_sharding(mesh)
    self._apply = jax.jit(self._forward, static_argnames=("outputs",))
    self._features: dict[str, dict[str, np.ndarray]] = {}
    self._info = None

  @property
  def has_head(self) -> bool:
    return "head" in self._variables

  @property
  def patch_size(self) -> int:
    return int(self.config.model.get("patch_size", 1))

  @property
  def info(self):
    if self._info is None:
      from bits_jax import data  # pylint: disable=g-import-not-at-top

      self._info = data.get_dataset_info(self.config)
    return self._info

  @property
  def num_classes(self) -> int:
    return int(self.info.num_classes)

  def add_plot(self, path: str) -> None:
    self.plots.append(path)

  def _forward(self, variables, images, outputs):
    backbone = train_state_lib.backbone_variables(variables, variables.get("batch_stats"))
    want_keys = "last_keys" in outputs
    out = self._components.backbone.apply(
        backbone,
        images,
        train=False,
        capture_intermediates=_last_keys_filter if want_keys else False,
        mutable=["intermediates"] if want_keys else False,
    )
    if want_keys:
      out, state = out
      out = dict(out, last_keys=_last_keys(state["intermediates"]))
    result = {k: out[k].astype(jnp.float32) for k in outputs if k in out}
    if "logits" in outputs:
      if not self.has_head:
        raise ValueError("these weights have no projection head: 'logits' are not available.")
      result["logits"] = self._components.head.apply(
          {"params": variables["head"]}, out["cls"]
      ).astype(jnp.float32)
    missing = sorted(set(outputs) - set(result))
    if missing:
      raise ValueError(f"the backbone does not output {missing}.")
    return result

  def predict_batch(self, images, outputs=("cls",)) -> dict[str, jax.Array]:
    """The model on one batch whose rows divide over the devices (global arrays out)."""
    if not isinstance(images, jax.Array):  # this process's rows -> one global batch
      images = utils.to_global(images, self._batch_sharding, "images")
    return self._apply(self._variables, images, outputs=tuple(outputs))

  def predict(self, images, outputs=("cls",)) -> dict[str, np.ndarray]:
    """The model on `images: [n, H, W, C]` (any n), in chunks of `eval_batch_size`."""
    images = np.asarray(images, np.float32)
    n, chunk = len(images), int(self.config.input.eval_batch_size)
    devices = self.mesh.devices.size
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, chunk):
      block = images[start : start + chunk]
      pad = -len(block) % devices
      if pad:
        block = np.concatenate([block, np.zeros((pad,) + block.shape[1:], block.dtype)])
      out = self.predict_batch(block, outputs)
      for key, value in out.items():
        parts.setdefault(key, []).append(utils.to_host(value)[: len(block) - pad])
    return {k: np.concatenate(v) for k, v in parts.items()}

  def normalize(self, images) -> np.ndarray:
    """uint8 `images: [n, H, W, C]` -> float32, normalised as the training pipeline does."""
    from bits_jax.data import augment  # pylint: disable=g-import-not-at-top

    spec = augment.color_spec(self.config.input)
    mean, std = spec.mean, spec.std
    return (np.asarray(images, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )

  def features(self, split: str) -> dict[str, np.ndarray]:
    """Frozen features of `split` (cached): 'cls', 'cls_last4'?, 'logits'?, 'label', 'mask'."""
    if split not in self._features:
      from bits_jax import data  # pylint: disable=g-import-not-at-top
      from bits_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top

      outputs = ("cls", "cls_last4") + (("logits",) if self.has_head else ())
      if not isinstance(self._components.backbone, vit_lib.ViT):
        outputs = tuple(o for o in outputs if o != "cls_last4")
      self._features[split] = features_lib.extract_features(
          lambda images: self.predict_batch(images, outputs),
          data.make_eval_iterator(self.config, split, with_ids=True),
          mesh=self.mesh,
      )
    return self._features[split]

  def images(self, split: str, rows) -> np.ndarray:
    """uint8 evaluation views [len(rows), S, S, C] of feature rows `rows: [k]` of `split`.

    Reads the split in the order `features` does and stops after the last wanted row, so a
    few rows near the start are cheap; padding rows come out black.
    """
    from bits_jax import data  # pylint: disable=g-import-not-at-top

    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and rows.min() < 0:
      raise ValueError(f"rows must be non-negative feature rows, got {rows.min()}.")
    wanted = np.unique(rows)
    found: dict[int, np.ndarray] = {}
    offset = 0
    for batch in data.make_eval_iterator(self.config, split):
      if len(found) == len(wanted):
        break
      size = len(batch["image"]) * jax.process_count()  # Rows of the global batch.
      hit = wanted[(wanted >= offset) & (wanted < offset + size)]
      if len(hit):  # Every process sees the same hits: the gather below is collective.
        local = self.denormalize(batch["image"])
        local = self.gather(local)
        for r in hit:
          found[int(r)] = local[r - offset]
      offset += size
    missing = [int(r) for r in wanted if int(r) not in found]
    if missing:
      raise ValueError(
          f"rows {missing[:5]} are beyond the {offset} feature rows of split {split!r}."
      )
    return np.stack([found[int(r)] for r in rows]) if rows.size else np.zeros((0,), np.uint8)

  def gather(self, rows) -> np.ndarray:
    """This process's rows of a batch [b, ...] -> the global batch's rows, numpy.

    The row order is that of `predict_batch` outputs and `features`; with one process the
    rows come back as they are.
    """
    if jax.process_count() == 1:
      return np.asarray(rows)
    return utils.to_host(utils.to_global(np.asarray(rows), self._batch_sharding, "rows"))

  def denormalize(self, images) -> np.ndarray:
    """The inverse of `normalize`: float32 images -> uint8 (rounded, clipped)."""
    from bits_jax.data import augment  # pylint: disable=g-import-not-at-top

    spec = augment.color_spec(self.config.input)
    pixels = np.asarray(images, np.float32) * np.asarray(spec.std, np.float32) + np.asarray(
        spec.mean, np.float32
    )
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def _last_keys_filter(module, method_name: str) -> bool:
  """capture_intermediates filter: the key projection of every attention block."""
  del method_name
  return module.name == "key" and module.parent is not None and module.parent.name == "attn"


def _last_keys(intermediates) -> jax.Array:
  """Keys of the last attention block's patch tokens, heads concatenated: [n, h*w, D]."""
  blocks = sorted(
      (k for k in intermediates if k.startswith("block")), key=lambda k: int(k[len("block") :])
  )
  keys = intermediates[blocks[-1]]["attn"]["key"]["__call__"][0]  # [n, 1 + h*w, heads, dh]
  return keys[:, 1:].reshape(keys.shape[0], keys.shape[1] - 1, -1).astype(jnp.float32)


def check_finite(x: np.ndarray, name: str, rows=None, *, block: int = 65536) -> None:
  """Raises ValueError when a row of `x: [n, d]` (only rows where `rows: [n]` bool is True,
  if given) holds NaN/inf; checked in row blocks (no full-size temporary)."""
  for start in range(0, len(x), block):
    bad = ~np.isfinite(x[start : start + block]).all(axis=1)
    if rows is not None:
      bad &= np.asarray(rows[start : start + block], bool)
    if bad.any():
      raise ValueError(
          f"{name} row {start + int(np.argmax(bad))} has non-finite values: the model "
          "produced NaN/inf features."
      )


class MissingData(ValueError):
  """An evaluator's data source is not configured (e.g. DAVIS or COCO paths left unset)."""


def head_is_message(ctx, num_outputs: int, max_bits: int) -> bool:
  """Whether a head of `num_outputs` logits is read as a binary code (logits > 0).

  A BITS head always is, whatever its width; another head (DINO's prototype scores, SimDINO's
  embedding) only up to `max_bits` outputs.
  """
  config = getattr(ctx, "config", None)
  objective = config.objective.name if config is not None and "objective" in config else None
  return objective == "bits" or num_outputs <= max_bits


def run_evaluators(ctx: EvalContext, evals, names=None, *, into=None, prefix="") -> dict[str, Any]:
  """Runs `config.evals` entries (all, or `names`) on `ctx`: {'<prefix><name>/<metric>': value}.

  Running all entries skips those whose data is not configured (`MissingData`, with a note);
  an entry named in `names` raises instead. With `into`, each entry's metrics go into that
  dict as soon as the entry finishes, and an entry that raises is named in its 'failed' key,
  so a caller that catches the error still holds every metric measured before it.
  """
  results: dict[str, Any] = {} if into is None else into
  for name, entry in evals.items():
    if names is not None and name not in names:
      continue
    kwargs = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
    try:
      metrics = get(entry["type"])(ctx, **kwargs)
    except Exception as e:
      if isinstance(e, MissingData) and names is None:
        print(f"evals.{name}: skipped ({e})", flush=True)
        continue
      results["failed"] = f"evals.{name}: {type(e).__name__}: {e}"
      raise
    for key, value in metrics.items():
      results[f"{prefix}{name}/{key}"] = value
  return results


_ENTRY_KEYS = ("type", "every", "at_end")
