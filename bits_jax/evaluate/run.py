"""The whole evaluation of one set of weights: k-NN, linear probe, retrieval, codes, dense.

`evaluate(config, weights=..., out_dir=...)` loads weights (a run's checkpoint or converted
weights, see `pretrained.py`), extracts frozen features of the bank split (k-NN bank, probe
training set, retrieval database) and the test split (queries), and writes
`results.json`, `results.md`, PNG plots and TensorBoard scalars/images under `out_dir`.
"""
import json
import os
from typing import Any, Optional

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bits_jax import sharding as sharding_lib
from bits_jax import train_state as train_state_lib
from bits_jax.evaluate import codes as codes_lib
from bits_jax.evaluate import dense
from bits_jax.evaluate import features as features_lib
from bits_jax.evaluate import knn
from bits_jax.evaluate import linear
from bits_jax.evaluate import plots
from bits_jax.evaluate import pretrained
from bits_jax.evaluate import retrieval


def model_params(config, weights: str, which: str = "teacher"):
  """({'backbone', 'head'?, 'batch_stats'?} adapted to the config's model, step)."""
  loaded, step = pretrained.load_params(weights, which)
  params, batch_stats = jax.eval_shape(
      lambda: train_state_lib.init_variables(config, jax.random.PRNGKey(0)))
  target = dict(params)
  if "head" not in loaded:  # e.g. converted backbone-only weights
    del target["head"]
  elif jax.tree_util.tree_structure(loaded["head"]) != jax.tree_util.tree_structure(
      target["head"]):
    logging.warning("Checkpoint head does not match config.method=%s: codes skipped.",
                    config.method)
    del target["head"]
  if batch_stats:
    target["batch_stats"] = batch_stats
  loaded = {k: loaded[k] for k in target if k in loaded}
  return pretrained.adapt_params(loaded, target), step


def make_apply_fn(config, params, mesh):
  """images [b, H, W, C] -> {'cls', 'cls_last4'?, 'patch_tokens', 'logits'?}, jitted.

  The backbone runs in eval mode (BatchNorm uses the stored running averages).
  """
  backbone, head, _ = train_state_lib.build_models(config)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  params = jax.device_put(params, sharding_lib.replicated(mesh))

  @jax.jit
  def apply(params, images):
    out = backbone.apply(train_state_lib.backbone_variables(params, params.get("batch_stats")),
                         images, train=False)
    result = {k: out[k].astype(jnp.float32) for k in ("cls", "cls_last4", "patch_tokens")
              if k in out}
    if "head" in params:
      result["logits"] = head.apply({"params": params["head"]}, out["cls"]).astype(
          jnp.float32)
    return result

  def fn(images, keep=("cls", "cls_last4", "logits")):
    if not isinstance(images, jax.Array):  # this process's rows -> one global batch
      images = jax.make_array_from_process_local_data(batch_sharding, np.asarray(images))
    out = apply(params, images)
    return {k: v for k, v in out.items() if k in keep}
  return fn


def _subset(n: int, limit: Optional[int], seed: int) -> np.ndarray:
  if not limit or limit >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def dense_probe(config, apply_fn) -> dict[str, float]:
  """Patch k-NN segmentation on synthetic squares sized for the model."""
  size, patch = config.global_crop_size, config.patch_size
  bank_images, bank_masks = dense.synthetic_squares(
      config.seed, config.eval_dense_images, image_size=size,
      min_side=max(patch, size // 4), max_side=max(patch, size // 2))
  query_images, query_masks = dense.synthetic_squares(
      config.seed + 1, config.eval_dense_images // 2, image_size=size,
      min_side=max(patch, size // 4), max_side=max(patch, size // 2))

  def patch_features(images):
    images = np.repeat(images, config.num_channels, axis=-1)
    out = []
    b = config.eval_batch_size
    for i in range(0, len(images), b):
      chunk = images[i:i + b]
      pad = b - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      tokens = np.asarray(apply_fn(chunk, keep=("patch_tokens",))["patch_tokens"])
      out.append(tokens[:b - pad])
    tokens = np.concatenate(out)
    grid = int(round(tokens.shape[1] ** 0.5))  # ViT: size / patch; ResNet: its output stride
    return tokens.reshape(len(images), grid, grid, -1)

  bank_feats, query_feats = patch_features(bank_images), patch_features(query_images)
  stride = size // bank_feats.shape[1]
  return dense.patch_knn_segmentation(
      bank_feats, dense.downsample_mask(bank_masks, stride, 2),
      query_feats, dense.downsample_mask(query_masks, stride, 2),
      num_classes=2, k=10)


def evaluate(config: ml_collections.ConfigDict, *, weights: str, out_dir: str,
             which: str = "teacher", mesh=None) -> dict[str, Any]:
  """Runs every evaluator on `weights`; writes results under `out_dir` and returns them."""
  from bits_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from bits_jax.data import sources  # pylint: disable=g-import-not-at-top

  mesh = mesh or sharding_lib.make_mesh(config)
  sharding_lib.check_batch_divisible(config.eval_batch_size, mesh, "eval_batch_size")
  params, step = model_params(config, weights, which)
  apply_fn = make_apply_fn(config, params, mesh)
  bank = features_lib.extract_features(apply_fn,
                                       pipeline.make_eval_iterator(config, config.bank_split))
  test = features_lib.extract_features(apply_fn,
                                       pipeline.make_eval_iterator(config, config.test_split))
  num_classes = sources.get_dataset_info(config).num_classes
  bank_valid, test_valid = bank["mask"].astype(bool), test["mask"].astype(bool)
  results: dict[str, Any] = {"weights": weights, "step": step, "which": which,
                             "dataset": config.dataset, "method": config.method}

  results.update(knn.knn_classify(
      bank["cls"], bank["label"], test["cls"], test["label"], num_classes=num_classes,
      ks=tuple(config.eval_knn_ks), temperature=config.knn_temperature,
      bank_mask=bank_valid, query_mask=test_valid, mesh=mesh))

  if config.eval_linear:
    feature_sets = {"cls": "cls"}
    if config.eval_linear_last4 and "cls_last4" in bank:
      feature_sets["last4"] = "cls_last4"
    for name, key in feature_sets.items():
      probe = linear.linear_probe(
          bank[key][bank_valid], bank["label"][bank_valid], test[key][test_valid],
          test["label"][test_valid], num_classes=num_classes,
          epochs=config.eval_linear_epochs, seed=config.seed)
      prefix = "" if name == "cls" else f"{name}/"
      results.update({prefix + k: v for k, v in probe.items()})

  # Retrieval: test split queries against the bank split database.
  q = np.flatnonzero(test_valid)[_subset(int(test_valid.sum()), config.eval_retrieval_queries,
                                         config.seed)]
  db = np.flatnonzero(bank_valid)
  curves = {}
  cutoffs = {"precision_at": tuple(k for k in (1, 10, 100, 1000) if k <= len(db))}
  cosine = retrieval.cosine_retrieval(test["cls"][q], test["label"][q], bank["cls"][db],
                                      bank["label"][db], **cutoffs)
  results.update({f"retrieval/cosine/{k}": v for k, v in cosine.items()})
  curves["cosine (features)"] = cosine
  analysis = None
  if "logits" in bank:
    hamming = retrieval.hamming_retrieval(
        retrieval.binarize(test["logits"][q]), test["label"][q],
        retrieval.binarize(bank["logits"][db]), bank["label"][db], **cutoffs)
    results.update({f"retrieval/hamming/{k}": v for k, v in hamming.items()})
    curves["hamming (bits)"] = hamming
    analysis = codes_lib.analyze_codes(test["logits"], test["label"], mask=test_valid)
    results.update(codes_lib.scalar_metrics(analysis))

  if config.eval_dense:
    results.update({f"dense/{k}": v for k, v in dense_probe(config, apply_fn).items()})

  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    paths = plots.save_plots(analysis, curves, os.path.join(out_dir, "plots"))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
      f.write(markdown_table(results))
    writer = metric_writers.create_default_writer(out_dir)
    scalars = {f"eval/{k}": float(v) for k, v in results.items()
               if isinstance(v, (float, int, np.floating)) and k != "step"}
    writer.write_scalars(step or 0, scalars)
    plots.log_plots(writer, step or 0, paths)
    writer.flush()
  return results


def markdown_table(results: dict[str, Any]) -> str:
  lines = ["| metric | value |", "| --- | --- |"]
  for key, value in results.items():
    if isinstance(value, (float, np.floating)):
      lines.append(f"| {key} | {value:.4f} |")
    else:
      lines.append(f"| {key} | {value} |")
  return "\n".join(lines) + "\n"
