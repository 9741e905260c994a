"""PyTorch state_dict <-> our Flax backbone variables (timm/DINO ViT, torchvision ResNet).

Pure functions on `{name: numpy array}` dicts: no torch, no file I/O (that is
`bits_jax.tools.convert`). Our variables are `{'params': ..., 'batch_stats': ...}` of the
backbone (`batch_stats` is empty for ViTs).

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
  - Classifier weights (`head.*`, `fc.*`) have no counterpart in our backbones: import lists
    them as ignored, export writes none.
"""

import re
from typing import Any, Mapping

import numpy as np

from bits_jax.models import resnet as resnet_lib
from bits_jax.models import vit as vit_lib

VIT_ARCHS = {f"vit_{name}": size for name, size in vit_lib.VIT_SIZES.items()}
RESNET_ARCHS = tuple(resnet_lib.RESNET_SIZES)
ARCHS = tuple(VIT_ARCHS) + RESNET_ARCHS
_STRIP_PREFIXES = ("module.", "backbone.")
_CLASSIFIER = re.compile(r"^(head|fc|fc_norm|head_drop)\.")


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _dense_in(sd, name):
  return {"kernel": _f32(sd[f"{name}.weight"]).T, "bias": _f32(sd[f"{name}.bias"])}


def _dense_out(p, name, out):
  out[f"{name}.weight"] = np.ascontiguousarray(np.asarray(p["kernel"]).T)
  out[f"{name}.bias"] = np.asarray(p["bias"])


def _norm_in(sd, name):
  return {"scale": _f32(sd[f"{name}.weight"]), "bias": _f32(sd[f"{name}.bias"])}


def _norm_out(p, name, out):
  out[f"{name}.weight"] = np.asarray(p["scale"])
  out[f"{name}.bias"] = np.asarray(p["bias"])


def _conv_in(weight) -> np.ndarray:
  return np.ascontiguousarray(_f32(weight).transpose(2, 3, 1, 0))


def _conv_out(kernel) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def _top_level(state_dict: Mapping[str, Any]) -> set[str]:
  """Top-level names, nested (`{'teacher': {...}}`) or flat (`'teacher.blocks.0...'`)."""
  return {name.split(".", 1)[0] for name in state_dict}


def clean_state_dict(state_dict: Mapping[str, Any], key: str | None = None) -> dict:
  """The network's tensors: `state_dict[key]` if given (DINO checkpoints), prefixes removed.

  `key` selects a nested dict (`.pth`) or the names starting with `key.` (flat files such as
  safetensors). Without `key`, a `{'state_dict': ...}` or `{'model': ...}` wrapper is
  unwrapped; a DINO training checkpoint (`teacher` and `student`) needs `key`.
  """
  if key:
    if isinstance(state_dict.get(key), Mapping):
      state_dict = state_dict[key]
    else:
      prefix = f"{key}."
      selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
      if not selected:
        raise KeyError(
            f"--key={key!r} not in the checkpoint (top-level keys: "
            f"{sorted(_top_level(state_dict))[:10]})."
        )
      state_dict = selected
  elif {"teacher", "student"} <= _top_level(state_dict):
    raise ValueError(
        "This is a DINO training checkpoint: choose the network with "
        "--key=teacher or --key=student."
    )
  elif "state_dict" in state_dict or "model" in state_dict:
    state_dict = state_dict.get("state_dict", state_dict.get("model"))
  out = {}
  for name, value in state_dict.items():
    for prefix in _STRIP_PREFIXES:
      while name.startswith(prefix):
        name = name[len(prefix) :]
    out[name] = value
  return out


# --------------------------------------------------------------------------------- ViT


def vit_depth(state_dict: Mapping[str, Any]) -> int:
  """Number of transformer blocks (`blocks.N.*` keys) of a timm/DINO ViT state_dict."""
  blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not blocks:
    raise ValueError("No 'blocks.N.*' keys: not a timm/DINO ViT state_dict.")
  return max(blocks) + 1


def vit_from_torch(state_dict: Mapping[str, Any], num_heads: int) -> tuple[dict, list[str]]:
  """(our ViT params, ignored classifier keys) from a timm/DINO ViT state_dict."""
  sd = dict(state_dict)
  width = _f32(sd["cls_token"]).shape[-1]
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by num_heads={num_heads}: check --arch.")
  head_dim = width // num_heads
  pos = _f32(sd["pos_embed"])
  params = {
      "patch_embed": {
          "kernel": _conv_in(sd["patch_embed.proj.weight"]),
          "bias": _f32(sd["patch_embed.proj.bias"]),
      },
      "pos_embed": pos[:, 1:],
      "cls_token": _f32(sd["cls_token"]) + pos[:, :1],
      "norm": _norm_in(sd, "norm"),
  }
  for i in range(vit_depth(sd)):
    t = f"blocks.{i}"
    qkv_w = _f32(sd[f"{t}.attn.qkv.weight"]).reshape(3, num_heads, head_dim, width)
    qkv_b = _f32(sd[f"{t}.attn.qkv.bias"]).reshape(3, num_heads, head_dim)
    attn = {
        name: {"kernel": np.ascontiguousarray(qkv_w[j].transpose(2, 0, 1)), "bias": qkv_b[j]}
        for j, name in enumerate(("query", "key", "value"))
    }
    proj_w = _f32(sd[f"{t}.attn.proj.weight"])  # [D, D]: [out, (heads, head_dim)]
    attn["out"] = {
        "kernel": np.ascontiguousarray(proj_w.T.reshape(num_heads, head_dim, width)),
        "bias": _f32(sd[f"{t}.attn.proj.bias"]),
    }
    params[f"block{i}"] = {
        "norm1": _norm_in(sd, f"{t}.norm1"),
        "attn": attn,
        "norm2": _norm_in(sd, f"{t}.norm2"),
        "mlp": {"fc1": _dense_in(sd, f"{t}.mlp.fc1"), "fc2": _dense_in(sd, f"{t}.mlp.fc2")},
    }
  ignored = sorted(set(sd) - set(vit_to_torch(params)))
  unexpected = [k for k in ignored if not _CLASSIFIER.match(k)]
  if unexpected:
    raise ValueError(
        f"ViT state_dict has keys our ViT has no place for: {unexpected[:5]} "
        "(LayerScale, registers, q/k norms or a distillation token are not "
        "supported)."
    )
  return params, ignored


def vit_to_torch(params: Mapping[str, Any]) -> dict:
  """timm/DINO ViT state_dict (numpy) from our ViT params (no classifier)."""
  if "pos_embed" not in params:
    raise ValueError(
        "This ViT has fixed sine-cosine position embeddings (config.model.posemb='sincos2d') "
        "and no pos_embed parameter; the timm/DINO layout has a learned one, so only ViTs "
        "trained with config.model.posemb='learn' (the default) can be exported."
    )
  out = {}
  cls = np.asarray(params["cls_token"])
  out["cls_token"] = cls
  out["pos_embed"] = np.concatenate([np.zeros_like(cls), np.asarray(params["pos_embed"])], axis=1)
  out["patch_embed.proj.weight"] = _conv_out(params["patch_embed"]["kernel"])
  out["patch_embed.proj.bias"] = np.asarray(params["patch_embed"]["bias"])
  depth = len([k for k in params if re.fullmatch(r"block\d+", k)])
  for i in range(depth):
    b, t = params[f"block{i}"], f"blocks.{i}"
    _norm_out(b["norm1"], f"{t}.norm1", out)
    attn = b["attn"]
    width, num_heads, head_dim = np.asarray(attn["query"]["kernel"]).shape
    out[f"{t}.attn.qkv.weight"] = np.concatenate(
        [
            np.asarray(attn[n]["kernel"]).transpose(1, 2, 0).reshape(width, width)
            for n in ("query", "key", "value")
        ],
        axis=0,
    )
    out[f"{t}.attn.qkv.bias"] = np.concatenate(
        [np.asarray(attn[n]["bias"]).reshape(width) for n in ("query", "key", "value")]
    )
    out[f"{t}.attn.proj.weight"] = np.ascontiguousarray(
        np.asarray(attn["out"]["kernel"]).reshape(num_heads * head_dim, width).T
    )
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
    if leaf == "weight" and np.ndim(value) == 4:
      _set(params, f"{path}/kernel", _conv_in(value))
    elif leaf == "weight":
      _set(params, f"{path}/scale", _f32(value))
    elif leaf == "bias":
      _set(params, f"{path}/bias", _f32(value))
    elif leaf == "running_mean":
      _set(stats, f"{path}/mean", _f32(value))
    elif leaf == "running_var":
      _set(stats, f"{path}/var", _f32(value))
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


def resnet_arch(state_dict: Mapping[str, Any]) -> str:
  """'resnet18' or 'resnet50', from the block structure of a torchvision state_dict."""
  bottleneck = any(k.startswith("layer1.0.conv3.") for k in state_dict)
  counts = [
      len({m.group(1) for k in state_dict if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
      for i in range(1, 5)
  ]
  if not any(counts):
    raise ValueError("No 'layerN.M.*' keys: not a torchvision ResNet state_dict.")
  for name, (block, stages) in resnet_lib.RESNET_SIZES.items():
    if (block == "bottleneck") == bottleneck and tuple(stages) == tuple(counts):
      return name
  raise ValueError(
      f"ResNet with blocks {counts} ({'bottleneck' if bottleneck else 'basic'}) "
      f"is not one of {RESNET_ARCHS}."
  )


# ------------------------------------------------------------------------- dispatchers


def from_torch(state_dict: Mapping[str, Any], arch: str) -> tuple[dict, dict]:
  """({'params', 'batch_stats'} of our backbone, meta) from a torch-layout state_dict.

  `meta` holds what builds the matching model (`model`, and `patch_size`,
  `global_crop_size` for ViTs or `resnet_width`, `resnet_small_stem` for ResNets;
  `num_channels`), `arch` and the `ignored_keys`.
  """
  if arch in VIT_ARCHS:
    width, _, num_heads = VIT_ARCHS[arch]
    params, ignored = vit_from_torch(state_dict, num_heads)
    if params["cls_token"].shape[-1] != width:
      raise ValueError(
          f"--arch={arch} has width {width}, the weights have {params['cls_token'].shape[-1]}."
      )
    kh, _, channels, _ = params["patch_embed"]["kernel"].shape
    grid = int(round(params["pos_embed"].shape[1] ** 0.5))
    meta = {
        "model": arch,
        "patch_size": int(kh),
        "global_crop_size": int(grid * kh),
        "num_channels": int(channels),
    }
    return {"params": params, "batch_stats": {}}, dict(meta, arch=arch, ignored_keys=ignored)
  if arch in RESNET_ARCHS:
    found = resnet_arch(state_dict)
    if found != arch:
      raise ValueError(f"--arch={arch}, but the state_dict is a {found}.")
    params, stats, ignored = resnet_from_torch(state_dict)
    kh, _, channels, width = params["conv1"]["kernel"].shape
    meta = {
        "model": arch,
        "resnet_width": int(width),
        "resnet_small_stem": bool(kh == 3),
        "num_channels": int(channels),
    }
    return ({"params": params, "batch_stats": stats}, dict(meta, arch=arch, ignored_keys=ignored))
  raise ValueError(f"Unknown --arch={arch!r}: use one of {ARCHS}.")


def to_torch(variables: Mapping[str, Any], arch: str) -> dict:
  """A torch-layout state_dict (numpy arrays) from {'params', 'batch_stats'} of our backbone."""
  if arch in VIT_ARCHS:
    return vit_to_torch(variables["params"])
  if arch in RESNET_ARCHS:
    return resnet_to_torch(variables["params"], variables.get("batch_stats") or {})
  raise ValueError(f"Unknown --arch={arch!r}: use one of {ARCHS}.")
