"""PyTorch <-> Flax weights for timm/DINO ViTs and torchvision ResNets.

  python -m bits_jax.models.convert --from=torch --in=dino_vits16.pth --arch=vit_small \
      --patch=16 --out=DIR
  python -m bits_jax.models.convert --from=flax --in=DIR --arch=vit_small --out=vit.pth

Import (`--from=torch`) reads a `state_dict` (a DINO training `checkpoint.pth` too: pick the
network with `--key=teacher|student`; the `module.` and `backbone.` prefixes are removed)
and writes an Orbax params directory `{'backbone': params[, 'batch_stats': {'backbone':
stats}]}` plus `convert_meta.json` with the config keys that build the matching model
(`model`, `patch_size`, `global_crop_size`, `num_channels`). Classifier weights (`head.*`,
`fc.*`) have no counterpart in our backbones and are listed as ignored.
Export (`--from=flax`) reads such a directory or a training checkpoint (the EMA teacher by
default) and writes a `torch.save`d state_dict that loads into timm's / torchvision's model
(without the classifier: `load_state_dict(..., strict=False)`).

Layout facts the mapping relies on:
  - Dense: torch `weight [out, in]` = our `kernel [in, out]` transposed.
  - Conv: torch `[out, in, kh, kw]` = our `[kh, kw, in, out]` transposed.
  - ViT attention: timm's fused `qkv.weight [3 D, D]` has rows ordered (q|k|v, head,
    head_dim); Flax's MultiHeadDotProductAttention keeps `query/key/value` kernels
    `[D, heads, head_dim]` and `out` kernel `[heads, head_dim, D]`.
  - ViT position embeddings: timm's `pos_embed [1, 1 + N, D]` includes a CLS position; our
    ViT has `pos_embed [1, N, D]` for the patches only and adds nothing to the CLS token, so
    import folds `pos_embed[:, 0]` into `cls_token` (the sum is all the model ever sees) and
    export writes `cls_token` back with a zero CLS position embedding.
  - BatchNorm: `weight, bias` -> params `scale, bias`; `running_mean, running_var` ->
    batch_stats `mean, var`; `num_batches_tracked` is dropped (exported as 0).
torch is imported only inside the functions that read or write `.pth` files.
"""
import argparse
import json
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

from bits_jax.models import resnet as resnet_lib
from bits_jax.models import vit as vit_lib

PyTree = Any
VIT_ARCHS = {f"vit_{name}": size for name, size in vit_lib.VIT_SIZES.items()}
RESNET_ARCHS = tuple(resnet_lib.RESNET_SIZES)
ARCHS = tuple(VIT_ARCHS) + RESNET_ARCHS
META_FILE = "convert_meta.json"
_STRIP_PREFIXES = ("module.", "backbone.")
_CLASSIFIER = re.compile(r"^(head|fc|fc_norm|head_drop)\.")


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):
    x = x.detach().cpu().numpy()
  return np.asarray(x, np.float32)


def _dense_in(sd, name):
  return {"kernel": _np(sd[f"{name}.weight"]).T, "bias": _np(sd[f"{name}.bias"])}


def _dense_out(p, name, out):
  out[f"{name}.weight"] = np.ascontiguousarray(p["kernel"].T)
  out[f"{name}.bias"] = np.asarray(p["bias"])


def _norm_in(sd, name):
  return {"scale": _np(sd[f"{name}.weight"]), "bias": _np(sd[f"{name}.bias"])}


def _norm_out(p, name, out):
  out[f"{name}.weight"] = np.asarray(p["scale"])
  out[f"{name}.bias"] = np.asarray(p["bias"])


def _conv_in(weight) -> np.ndarray:
  return np.ascontiguousarray(_np(weight).transpose(2, 3, 1, 0))


def _conv_out(kernel) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def clean_state_dict(state_dict: Mapping[str, Any], key: str | None = None) -> dict:
  """The network's tensors: `state_dict[key]` if given (DINO checkpoints), prefixes removed."""
  if key:
    if key not in state_dict:
      raise KeyError(f"--key={key!r} not in the checkpoint (top-level keys: "
                     f"{sorted(state_dict)[:10]}).")
    state_dict = state_dict[key]
  elif "teacher" in state_dict and "student" in state_dict:
    raise ValueError("This is a DINO training checkpoint: choose the network with "
                     "--key=teacher or --key=student.")
  elif "state_dict" in state_dict or "model" in state_dict:
    state_dict = state_dict.get("state_dict", state_dict.get("model"))
  out = {}
  for name, value in state_dict.items():
    for prefix in _STRIP_PREFIXES:
      while name.startswith(prefix):
        name = name[len(prefix):]
    out[name] = value
  return out


# --------------------------------------------------------------------------------- ViT


def vit_depth(state_dict) -> int:
  blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not blocks:
    raise ValueError("No 'blocks.N.*' keys: not a timm/DINO ViT state_dict.")
  return max(blocks) + 1


def vit_from_torch(state_dict: Mapping[str, Any], num_heads: int) -> tuple[dict, list[str]]:
  """(our ViT params, ignored classifier keys) from a timm/DINO ViT state_dict."""
  sd = dict(state_dict)
  width = _np(sd["cls_token"]).shape[-1]
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by num_heads={num_heads}: check --arch.")
  head_dim = width // num_heads
  depth = vit_depth(sd)
  pos = _np(sd["pos_embed"])
  params = {
      "patch_embed": {"kernel": _conv_in(sd["patch_embed.proj.weight"]),
                      "bias": _np(sd["patch_embed.proj.bias"])},
      "pos_embed": pos[:, 1:],
      "cls_token": _np(sd["cls_token"]) + pos[:, :1],
      "norm": _norm_in(sd, "norm"),
  }
  for i in range(depth):
    t = f"blocks.{i}"
    qkv_w = _np(sd[f"{t}.attn.qkv.weight"]).reshape(3, num_heads, head_dim, width)
    qkv_b = _np(sd[f"{t}.attn.qkv.bias"]).reshape(3, num_heads, head_dim)
    attn = {name: {"kernel": np.ascontiguousarray(qkv_w[j].transpose(2, 0, 1)),
                   "bias": qkv_b[j]}
            for j, name in enumerate(("query", "key", "value"))}
    proj_w = _np(sd[f"{t}.attn.proj.weight"])  # [D, D]: [out, (heads, head_dim)]
    attn["out"] = {"kernel": np.ascontiguousarray(proj_w.T.reshape(num_heads, head_dim, width)),
                   "bias": _np(sd[f"{t}.attn.proj.bias"])}
    params[f"block{i}"] = {
        "norm1": _norm_in(sd, f"{t}.norm1"),
        "attn": attn,
        "norm2": _norm_in(sd, f"{t}.norm2"),
        "mlp": {"fc1": _dense_in(sd, f"{t}.mlp.fc1"), "fc2": _dense_in(sd, f"{t}.mlp.fc2")},
    }
  expected = set(vit_to_torch(params))
  ignored = sorted(set(sd) - expected)
  unexpected = [k for k in ignored if not _CLASSIFIER.match(k)]
  if unexpected:
    raise ValueError(f"ViT state_dict has keys our ViT has no place for: {unexpected[:5]} "
                     f"(LayerScale, registers, q/k norms or a distillation token are not "
                     f"supported).")
  return params, ignored


def vit_to_torch(params: Mapping[str, Any]) -> dict:
  """timm/DINO ViT state_dict (numpy) from our ViT params (no classifier)."""
  out = {}
  cls = np.asarray(params["cls_token"])
  pos = np.asarray(params["pos_embed"])
  out["cls_token"] = cls
  out["pos_embed"] = np.concatenate([np.zeros_like(cls), pos], axis=1)
  out["patch_embed.proj.weight"] = _conv_out(params["patch_embed"]["kernel"])
  out["patch_embed.proj.bias"] = np.asarray(params["patch_embed"]["bias"])
  depth = len([k for k in params if re.fullmatch(r"block\d+", k)])
  for i in range(depth):
    b, t = params[f"block{i}"], f"blocks.{i}"
    _norm_out(b["norm1"], f"{t}.norm1", out)
    attn = b["attn"]
    width, num_heads, head_dim = np.asarray(attn["query"]["kernel"]).shape
    out[f"{t}.attn.qkv.weight"] = np.concatenate(
        [np.asarray(attn[n]["kernel"]).transpose(1, 2, 0).reshape(width, width)
         for n in ("query", "key", "value")], axis=0)
    out[f"{t}.attn.qkv.bias"] = np.concatenate(
        [np.asarray(attn[n]["bias"]).reshape(width) for n in ("query", "key", "value")])
    out[f"{t}.attn.proj.weight"] = np.ascontiguousarray(
        np.asarray(attn["out"]["kernel"]).reshape(num_heads * head_dim, width).T)
    out[f"{t}.attn.proj.bias"] = np.asarray(attn["out"]["bias"])
    _norm_out(b["norm2"], f"{t}.norm2", out)
    _dense_out(b["mlp"]["fc1"], f"{t}.mlp.fc1", out)
    _dense_out(b["mlp"]["fc2"], f"{t}.mlp.fc2", out)
  _norm_out(params["norm"], "norm", out)
  return out


# ------------------------------------------------------------------------------ ResNet


def _flax_module_name(torch_prefix: str) -> str:
  """'layer1.0.downsample.0' -> 'layer1_0/downsample_conv' (our module path)."""
  name = re.sub(r"^layer(\d+)\.(\d+)", r"layer\1_\2", torch_prefix)
  name = name.replace(".downsample.0", ".downsample_conv")
  name = name.replace(".downsample.1", ".downsample_bn")
  return name.replace(".", "/")


def _torch_module_name(flax_path: str) -> str:
  name = flax_path.replace("/downsample_conv", ".downsample.0")
  name = name.replace("/downsample_bn", ".downsample.1")
  name = re.sub(r"^layer(\d+)_(\d+)", r"layer\1.\2", name)
  return name.replace("/", ".")


def _set(tree: dict, path: str, value):
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten(v, path))
    else:
      out[path] = v
  return out


def resnet_from_torch(state_dict: Mapping[str, Any]) -> tuple[dict, dict, list[str]]:
  """(params, batch_stats, ignored keys) of our ResNet from a torchvision state_dict."""
  params, stats, ignored = {}, {}, []
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if _CLASSIFIER.match(key) or leaf == "num_batches_tracked":
      ignored.append(key)
      continue
    path = _flax_module_name(module)
    is_conv = _np(value).ndim == 4
    if is_conv and leaf == "weight":
      _set(params, f"{path}/kernel", _conv_in(value))
    elif leaf == "weight":
      _set(params, f"{path}/scale", _np(value))
    elif leaf == "bias":
      _set(params, f"{path}/bias", _np(value))
    elif leaf == "running_mean":
      _set(stats, f"{path}/mean", _np(value))
    elif leaf == "running_var":
      _set(stats, f"{path}/var", _np(value))
    else:
      raise ValueError(f"Unexpected ResNet key {key!r}: not a torchvision ResNet state_dict.")
  return params, stats, sorted(ignored)


def resnet_to_torch(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict:
  """torchvision ResNet state_dict (numpy; no `fc`) from our ResNet params and batch_stats."""
  out = {}
  for path, value in _flatten(params).items():
    module, _, leaf = path.rpartition("/")
    name = _torch_module_name(module)
    value = np.asarray(value)
    if leaf == "kernel":
      out[f"{name}.weight"] = _conv_out(value)
    elif leaf == "scale":
      out[f"{name}.weight"] = value
    else:
      out[f"{name}.bias"] = value
  for path, value in _flatten(batch_stats).items():
    module, _, leaf = path.rpartition("/")
    name = _torch_module_name(module)
    out[f"{name}.running_{leaf}"] = np.asarray(value)
    out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
  return out


def resnet_arch(state_dict) -> str:
  """'resnet18' or 'resnet50', from the block structure of a torchvision state_dict."""
  bottleneck = any(k.startswith("layer1.0.conv3.") for k in state_dict)
  counts = [len({m.group(1) for k in state_dict if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
            for i in range(1, 5)]
  for name, (block, stages) in resnet_lib.RESNET_SIZES.items():
    if (block == "bottleneck") == bottleneck and tuple(stages) == tuple(counts):
      return name
  raise ValueError(f"ResNet with blocks {counts} ({'bottleneck' if bottleneck else 'basic'}) "
                   f"is not one of {RESNET_ARCHS}.")


# ------------------------------------------------------------------------- dispatchers


def from_torch(state_dict: Mapping[str, Any], arch: str) -> tuple[dict, dict]:
  """({'params': ..., 'batch_stats': ...} of our backbone, meta) from a torch state_dict.

  `meta` holds the config keys that build the matching model and the ignored keys.
  """
  if arch in VIT_ARCHS:
    width, _, num_heads = VIT_ARCHS[arch]
    params, ignored = vit_from_torch(state_dict, num_heads)
    if params["cls_token"].shape[-1] != width:
      raise ValueError(f"--arch={arch} has width {width}, the weights have "
                       f"{params['cls_token'].shape[-1]}.")
    kh, _, channels, _ = params["patch_embed"]["kernel"].shape
    grid = int(round(params["pos_embed"].shape[1] ** 0.5))
    meta = {"model": arch, "patch_size": int(kh), "global_crop_size": int(grid * kh),
            "num_channels": int(channels)}
    return {"params": params, "batch_stats": {}}, dict(meta, arch=arch, ignored_keys=ignored)
  if arch in RESNET_ARCHS:
    found = resnet_arch(state_dict)
    if found != arch:
      raise ValueError(f"--arch={arch}, but the state_dict is a {found}.")
    params, stats, ignored = resnet_from_torch(state_dict)
    kh, _, channels, width = params["conv1"]["kernel"].shape
    meta = {"model": arch, "resnet_width": int(width), "resnet_small_stem": kh == 3,
            "num_channels": int(channels)}
    return {"params": params, "batch_stats": stats}, dict(meta, arch=arch,
                                                          ignored_keys=ignored)
  raise ValueError(f"Unknown --arch={arch!r}: use one of {ARCHS}.")


def to_torch(variables: Mapping[str, Any], arch: str) -> dict:
  """A torch state_dict (numpy arrays) from {'params', 'batch_stats'} of our backbone."""
  if arch in VIT_ARCHS:
    return vit_to_torch(variables["params"])
  if arch in RESNET_ARCHS:
    return resnet_to_torch(variables["params"], variables.get("batch_stats") or {})
  raise ValueError(f"Unknown --arch={arch!r}: use one of {ARCHS}.")


# ------------------------------------------------------------------------------- files


def load_torch_state_dict(path: str, key: str | None = None) -> dict:
  """A `.pth` file's state_dict as {name: numpy}, via CPU torch (imported here only)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading .pth files needs PyTorch: pip install 'bits_jax[torch]' "
                      "(or torch).") from e
  obj = torch.load(path, map_location="cpu", weights_only=False)
  if hasattr(obj, "state_dict") and not isinstance(obj, Mapping):
    obj = obj.state_dict()
  state = clean_state_dict(obj, key)
  return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
          for k, v in state.items()}


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
             path)


def save_converted(directory: str, variables: Mapping[str, Any], meta: Mapping) -> None:
  """Orbax params directory {'backbone'[, 'batch_stats': {'backbone'}]} + convert_meta.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = {"backbone": variables["params"]}
  if variables.get("batch_stats"):
    tree["batch_stats"] = {"backbone": variables["batch_stats"]}
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory, tree, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, META_FILE), "w") as f:
    json.dump(dict(meta), f, indent=2)


def load_converted(directory: str, which: str = "teacher") -> dict:
  """{'params', 'batch_stats'} of a backbone from a converted directory or a train checkpoint.

  A train checkpoint (`.../checkpoints/STEP/default` or a run's workdir: the latest step)
  gives the EMA teacher's backbone (`which='student'` for the student).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  if steps:
    directory = os.path.join(directory, str(steps[-1]))
  if os.path.isdir(os.path.join(directory, "default")):
    directory = os.path.join(directory, "default")
  tree = ocp.StandardCheckpointer().restore(directory)
  if "teacher_params" in tree:
    params = tree["teacher_params" if which == "teacher" else "params"]["backbone"]
    stats = tree.get("teacher_batch_stats" if which == "teacher" else "batch_stats") or {}
  elif "backbone" in tree:
    params, stats = tree["backbone"], tree.get("batch_stats") or {}
  else:
    raise ValueError(f"{directory} holds neither a train state nor converted params "
                     f"(keys: {sorted(tree)}).")
  to_np = lambda t: {k: to_np(v) if isinstance(v, Mapping) else np.asarray(v)
                     for k, v in t.items()}
  return {"params": to_np(params), "batch_stats": to_np(stats.get("backbone", {}))}


# --------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m bits_jax.models.convert",
      description="Convert timm/DINO ViT and torchvision ResNet weights to and from our "
                  "Flax backbones.")
  p.add_argument("--from", dest="source", required=True, choices=("torch", "flax"),
                 help="torch: .pth -> Orbax params directory; flax: directory -> .pth.")
  p.add_argument("--in", dest="input", required=True,
                 help="A .pth file (--from=torch) or a converted/params or checkpoint "
                      "directory (--from=flax).")
  p.add_argument("--arch", required=True, choices=ARCHS)
  p.add_argument("--patch", type=int, default=None,
                 help="ViT patch size, checked against the weights.")
  p.add_argument("--out", required=True, help="Output directory (torch) or .pth (flax).")
  p.add_argument("--key", default=None,
                 help="Sub-dict of a training checkpoint, e.g. 'teacher' for DINO's "
                      "checkpoint.pth.")
  p.add_argument("--which", default="teacher", choices=("teacher", "student"),
                 help="With --from=flax on a train checkpoint: which network to export.")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.source == "torch":
    state_dict = load_torch_state_dict(args.input, args.key)
    variables, meta = from_torch(state_dict, args.arch)
    if args.patch is not None and meta.get("patch_size") not in (None, args.patch):
      raise ValueError(f"--patch={args.patch}, but the weights have patch size "
                       f"{meta['patch_size']}.")
    save_converted(args.out, variables, meta)
    print(f"Wrote {args.out} ({args.arch}); config: "
          f"{ {k: v for k, v in meta.items() if k not in ('arch', 'ignored_keys')} }; "
          f"ignored: {meta['ignored_keys']}")
  else:
    variables = load_converted(args.input, args.which)
    state_dict = to_torch(variables, args.arch)
    save_torch_state_dict(state_dict, args.out)
    print(f"Wrote {args.out}: {len(state_dict)} tensors ({args.arch}, no classifier).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
