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
                          'label': [n] (int) or [n, classes] (multi-hot), 'mask': [n] bool}
                   frozen features of a split of the evaluation dataset, cached per split
                   ('logits' only when the weights have a BITS head; mask=False on padding)
  ctx.predict(images, outputs=('cls',)) -> {name: np.ndarray}
                   the frozen model on `images: [n, H, W, C]` float32, already normalised
                   (any n, any H, W divisible by the patch size); outputs among 'cls',
                   'cls_last4', 'patch_tokens' [n, h*w, D], 'logits' [n, bits],
                   'last_keys' [n, h*w, D] (keys of the last attention block, ViT only)
  ctx.normalize(images_uint8) -> float32 images normalised as in training
  ctx.add_plot(path) registers a written PNG for TensorBoard
"""
from typing import Any, Callable

EvaluatorFn = Callable[..., dict[str, Any]]
_REGISTRY: dict[str, EvaluatorFn] = {}
# Evaluator modules import this one; importing them all fills the registry.
_MODULES = ()


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
    raise ValueError(f"Unknown evaluator type {name!r}: use one of {sorted(_REGISTRY)}.")
  return _REGISTRY[name]
