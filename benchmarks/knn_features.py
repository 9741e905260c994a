"""Which backbone features carry what a k-NN needs: the k-NN protocol on several read-outs.

The project's k-NN evaluator (DINO's protocol) classifies with the final CLS token. This
script runs the same weighted cosine k-NN (the config's k-NN entry: splits, k, temperature)
of a finished run on several read-outs of the same forward pass, for the trained teacher, the
student, the same model at random init (seed + 1, as `bits_jax.train` evaluates it) and the
raw pixels:

  cls               the final CLS token, [n, width] (the protocol)
  cls_last4         the CLS tokens of the last four blocks, each normalised, [n, 4 width]
  mean_patch        the mean of the final patch tokens, [n, width]
  cls+mean_patch    both L2-normalised and concatenated, [n, 2 width]
  patch_tokens      the final patch tokens flattened in grid order, [n, tokens x width]

`patch_tokens` keeps where on the image each token sits, as the pixels do; the pooled
read-outs do not. A diagnostic, not a protocol: the evaluators and `results.json` keep the
CLS token.

  python benchmarks/knn_features.py --workdir=workdirs/fashion_mnist_bits

Measured (the demo's run at 762bda4, before its whole-image second global view, seed 0,
1200 steps; k = 20, T = 0.07, 60k bank, 10k queries; 2-core AVX2 host, 2026-12-07), top-1 %:

| read-out | dims | trained teacher | trained student | random init |
|---|---|---|---|---|
| cls (the protocol) | 128 | 83.36 | 83.49 | 73.86 |
| cls_last4 | 512 | 83.82 | 83.91 | 73.88 |
| mean_patch | 128 | 81.32 | 81.35 | 74.79 |
| cls+mean_patch | 256 | 83.53 | 83.68 | 74.61 |
| patch_tokens | 2048 | 85.39 | 85.37 | 83.68 |

Raw pixels (784 dims): 84.59. At random init the flattened patch tokens are already within a
point of the pixels; training adds 1.7 points to them and 9.5 to the CLS token. The pooled
token gives up the layout that a k-NN on this aligned dataset (every item centred, in one
orientation) draws on: the likely home of the CLS k-NN's last 1.2 points to the pixels.
"""

from __future__ import annotations

import argparse
import os
import time

import common  # pylint: disable=unused-import  (puts the repository on sys.path)


def read_outs(outputs) -> dict:
  """{read-out name: [n, d] float32} from the backbone's outputs of one split."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  patches = outputs["patch_tokens"]
  return {
      "cls": outputs["cls"],
      "cls_last4": outputs["cls_last4"],
      "mean_patch": patches.mean(axis=1),
      "cls+mean_patch": np.concatenate([unit(outputs["cls"]), unit(patches.mean(axis=1))], -1),
      "patch_tokens": patches.reshape(len(patches), -1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished run's workdir")
  parser.add_argument(
      "--models",
      default="teacher,student,random_init",
      help="comma-separated: teacher, student, random_init",
  )
  parser.add_argument("--no-pixels", dest="pixels", action="store_false")
  args = parser.parse_args()
  models = args.models.split(",")
  unknown = sorted(set(models) - {"teacher", "student", "random_init"})
  if unknown:
    raise SystemExit(f"--models: unknown {unknown}; use teacher, student, random_init.")

  from bits_jax import data  # pylint: disable=g-import-not-at-top
  from bits_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from bits_jax import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import common as eval_common  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import knn  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import pixel_baseline  # pylint: disable=g-import-not-at-top
  from bits_jax.evaluate import run as run_lib  # pylint: disable=g-import-not-at-top
  from bits_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(args.workdir, "config.json")
  if not os.path.exists(config_path):
    raise SystemExit(f"{config_path} not found: give the workdir of a run of bits_jax.main.")
  with open(config_path) as f:
    config = run_lib.config_from_json(f.read())
  entry = pixel_baseline.knn_entry(config)
  ks, temperature = tuple(entry.get("ks", (20,))), float(entry.get("temperature", 0.07))
  mesh = sharding_lib.make_mesh(config)
  components = train_state_lib.build(config)
  if not isinstance(components.backbone, vit_lib.ViT):
    raise SystemExit(f"model {config.model.name!r}: the read-outs need a ViT backbone.")

  rows: dict[str, dict[str, float]] = {}
  dims: dict[str, int] = {}
  for model in models:
    if model == "random_init":
      variables = train_state_lib.random_init_variables(config, components)
    else:
      variables, _ = run_lib.load_variables(config, components, args.workdir, model)
    ctx = eval_common.EvalContext(config, components, variables, mesh)
    start = time.time()
    splits = {}
    for split in (entry.bank_split, entry.query_split):
      outputs = features_lib.extract_features(
          lambda images: ctx.predict_batch(images, ("cls", "cls_last4", "patch_tokens")),
          data.make_eval_iterator(config, split),
          mesh=mesh,
      )
      splits[split] = (read_outs(outputs), outputs["label"], outputs["mask"])
    print(f"{model}: features in {time.time() - start:.0f} s", flush=True)
    bank, bank_labels, bank_mask = splits[entry.bank_split]
    queries, query_labels, query_mask = splits[entry.query_split]
    for name in bank:
      dims[name] = bank[name].shape[-1]
      result = knn.knn_classify(
          bank[name],
          bank_labels,
          queries[name],
          query_labels,
          num_classes=ctx.num_classes,
          ks=ks,
          temperature=temperature,
          bank_mask=bank_mask,
          query_mask=query_mask,
          mesh=mesh,
      )
      rows.setdefault(name, {})[model] = 100 * result[f"knn_top1_k{ks[0]}"]
      print(f"  {name}: {rows[name][model]:.2f}%", flush=True)

  print(
      f"\nweighted k-NN top-1 %, k = {ks[0]}, T = {temperature}, "
      f"{config.input.dataset}: {entry.query_split} against {entry.bank_split}"
  )
  print("| read-out | dims | " + " | ".join(models) + " |")
  print("|---|---|" + "---|" * len(models))
  for name, by_model in rows.items():
    cells = " | ".join(f"{by_model[m]:.2f}" for m in models)
    print(f"| {name} | {dims[name]} | {cells} |")
  if args.pixels:
    pixels = pixel_baseline.pixel_knn(config, mesh, normalized=False)
    print(f"\nraw pixels: {100 * pixels[f'knn_top1_k{ks[0]}']:.2f}")


if __name__ == "__main__":
  main()
