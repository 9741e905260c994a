r"""Convert backbone weights between PyTorch (.pth, .safetensors) and our params directories.

  python -m bits_jax.tools.convert --from=torch --in=dino_vits16.pth --arch=vit_small \
      --patch=16 --out=DIR
  python -m bits_jax.tools.convert --from=safetensors --in=model.safetensors \
      --arch=vit_small --out=DIR
  python -m bits_jax.tools.convert --from=flax --in=WORKDIR --arch=vit_small \
      --out=vit_small.safetensors

`--from` names the input: `torch` (a `torch.save`d state_dict; DINO's training
`checkpoint.pth` too, with `--key=teacher|student`), `safetensors` (timm / Hugging Face
weights; read without torch), `flax` (a run workdir, checkpoint or params directory: see
`bits_jax.weights`; the EMA teacher unless `--which=student`). The extension of `--out`
picks the output: `.safetensors` or `.pth` (a timm / torchvision state_dict without the
classifier, loadable with `load_state_dict(..., strict=False)`), anything else a params
directory (`bits_jax.weights.save_params`, with `convert_meta.json`) usable as
`--config.init_from=DIR` or `python -m bits_jax.evaluate --weights=DIR`. An existing `--out`
is replaced only when it is an earlier export: a file for .safetensors / .pth, a directory
holding `convert_meta.json` (and no `checkpoints/` or `config.json`) for a params directory;
anything else (a run's workdir, a directory where a file is to go) is refused before
anything is read or written.

`.pth` files are read with `torch.load(weights_only=True)`: tensors and plain containers
only, plus `argparse.Namespace` (DINO stores its arguments in checkpoints). A file holding
any other object is refused, so a downloaded checkpoint cannot run code. Paths may be any
`etils.epath` path (`gs://...`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import struct
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags
from etils import epath
import numpy as np

from bits_jax import utils
from bits_jax import weights
from bits_jax.models import torch_mapping

SOURCES = ("torch", "safetensors", "flax")
# Non-tensor classes a weights-only torch.load may rebuild (nothing here runs code).
SAFE_GLOBALS = (argparse.Namespace,)
_TORCH_SUFFIXES = (".pth", ".pt")
# numpy dtypes of safetensors' type names, for files numpy's backend cannot read (bfloat16).
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class UnsafeCheckpointError(ValueError):
  """A .pth file holds objects a weights-only load must not rebuild."""


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Reading or writing .pth files needs PyTorch (the CPU build is enough): "
        "pip install 'bits_jax[torch]'. safetensors files need no torch."
    ) from e
  return torch


@contextlib.contextmanager
def _safe_globals(torch):
  """SAFE_GLOBALS allowed for the weights-only unpickler (torch >= 2.4) within the block."""
  scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
  if scoped is not None:
    with scoped(list(SAFE_GLOBALS)):
      yield
    return
  if hasattr(torch.serialization, "add_safe_globals"):  # torch 2.4
    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
  yield


def _tensor_to_numpy(torch, value) -> np.ndarray:
  if isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    if value.dtype in (torch.float16, torch.bfloat16):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_torch(path: epath.PathLike, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """A `.pth` file's network as {name: numpy} (weights-only load, see module docstring)."""
  data = io.BytesIO(epath.Path(path).read_bytes())
  torch = _import_torch()
  try:
    with _safe_globals(torch):
      obj = torch.load(data, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    raise UnsafeCheckpointError(
        f"Refused to load {path}: it holds Python objects other than tensors, plain "
        f"containers and {[c.__module__ + '.' + c.__name__ for c in SAFE_GLOBALS]}, and "
        f"rebuilding them could run code ({reason}). If the file comes from a source you "
        "trust, load it in PyTorch yourself, save its state_dict with "
        "safetensors.torch.save_file(state_dict, 'weights.safetensors') and convert that "
        "with --from=safetensors."
    ) from e
  if not isinstance(obj, Mapping):
    raise ValueError(
        f"{path} holds a {type(obj).__name__}, not a state_dict: save "
        "model.state_dict() instead of the model."
    )
  state = torch_mapping.clean_state_dict(obj, key)
  return {name: _tensor_to_numpy(torch, value) for name, value in state.items()}


def write_torch(state_dict: Mapping[str, np.ndarray], path: epath.PathLike) -> None:
  """A `torch.save`d state_dict of torch tensors (needs torch)."""
  torch = _import_torch()
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, buffer)
  _write_bytes(path, buffer.getvalue())


def _safetensors_dtypes(data: bytes) -> set[str]:
  """The dtype names in a safetensors header (8-byte little-endian length, then JSON)."""
  (length,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8 : 8 + length])
  return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _decode_safetensors(data: bytes) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  if "BF16" not in _safetensors_dtypes(data):
    return safetensors.numpy.load(data)
  # numpy has no bfloat16 (what numpy's backend lacks); JAX's bfloat16 is a numpy dtype.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtypes = dict(_SAFETENSORS_DTYPES, BF16=jnp.bfloat16)
  out = {}
  for name, tensor in safetensors.deserialize(data):
    if tensor["dtype"] not in dtypes:
      raise ValueError(f"Tensor {name!r} has dtype {tensor['dtype']}, which we cannot read.")
    out[name] = np.frombuffer(tensor["data"], dtypes[tensor["dtype"]]).reshape(tensor["shape"])
  return out


def read_safetensors(path: epath.PathLike, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """A `.safetensors` file's network as {name: numpy} (no torch needed)."""
  return torch_mapping.clean_state_dict(_decode_safetensors(epath.Path(path).read_bytes()), key)


def write_safetensors(
    state_dict: Mapping[str, np.ndarray],
    path: epath.PathLike,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
  """A `.safetensors` file with `metadata` (and `format: pt`, which Hugging Face expects)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  _write_bytes(path, safetensors.numpy.save(tensors, metadata={"format": "pt", **(metadata or {})}))


def _write_bytes(path: epath.PathLike, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def output_format(path: epath.PathLike) -> str:
  """'safetensors', 'torch' or 'flax' (a params directory), from the output's extension."""
  suffix = epath.Path(path).suffix
  if suffix == ".safetensors":
    return "safetensors"
  return "torch" if suffix in _TORCH_SUFFIXES else "flax"


def check_output(path: epath.PathLike) -> None:
  """FileExistsError unless `path` is new or an earlier export we may replace (see above)."""
  kind = output_format(path)
  if kind == "flax":
    weights.check_replaceable(path)
    return
  path = epath.Path(path)
  if path.is_dir():
    raise FileExistsError(
        f"--out={path} is an existing directory; a {kind} export is one file, and a directory "
        "is never replaced. Pick a new --out (a file path) or delete it yourself."
    )


def config_overrides(meta: Mapping[str, Any]) -> list[str]:
  """The command-line config overrides that build the model of converted weights."""
  keys = {
      "model": "model.name",
      "patch_size": "model.patch_size",
      "global_crop_size": "input.crops.global_size",
      "resnet_width": "model.width",
      "resnet_small_stem": "model.small_stem",
      "num_channels": "input.num_channels",
  }
  return [f"--config.{name}={meta[k]}" for k, name in keys.items() if k in meta]


def _read_variables(
    source: str, path: str, arch: str, key: Optional[str], which: str
) -> tuple[dict, dict]:
  """({'params', 'batch_stats'} of the backbone, meta) from any input."""
  if source == "flax":
    loaded, _ = weights.load_params(path, which)
    variables = {
        "params": loaded["backbone"],
        "batch_stats": loaded.get("batch_stats", {}).get("backbone", {}),
    }
    # Through the torch layout and back: checks --arch and describes the model.
    _, meta = torch_mapping.from_torch(torch_mapping.to_torch(variables, arch), arch)
    return variables, dict(meta, ignored_keys=[])
  if source == "torch":
    state_dict = read_torch(path, key)
  elif source == "safetensors":
    state_dict = read_safetensors(path, key)
  else:
    raise ValueError(f"--from={source!r}: use one of {SOURCES}.")
  return torch_mapping.from_torch(state_dict, arch)


def convert(
    source: str,
    input_path: str,
    output_path: str,
    arch: str,
    patch: Optional[int] = None,
    key: Optional[str] = None,
    which: str = "teacher",
) -> dict:
  """Reads `input_path` (`source` format), writes `output_path`; returns the meta.

  FileExistsError (before reading anything) when `output_path` may not be replaced.
  """
  check_output(output_path)
  variables, meta = _read_variables(source, input_path, arch, key, which)
  if patch is not None and meta.get("patch_size") not in (None, patch):
    raise ValueError(f"--patch={patch}, but the weights have patch size {meta['patch_size']}.")
  kind = output_format(output_path)
  if kind == "flax":
    params = {"backbone": variables["params"]}
    if variables.get("batch_stats"):
      params["batch_stats"] = {"backbone": variables["batch_stats"]}
    weights.save_params(output_path, params, meta)
  elif kind == "safetensors":
    write_safetensors(torch_mapping.to_torch(variables, arch), output_path, {"arch": arch})
  else:
    write_torch(torch_mapping.to_torch(variables, arch), output_path)
  return meta


# --------------------------------------------------------------------------------- CLI


def _define_flags(flag_values: flags.FlagValues) -> None:
  define = {"flag_values": flag_values}
  flags.DEFINE_enum(
      "from",
      None,
      SOURCES,
      "Input format: torch (.pth), safetensors, or "
      "flax (a run workdir, checkpoint or params directory).",
      **define,
  )
  flags.DEFINE_string("in", None, "Input file or directory.", **define)
  flags.DEFINE_string(
      "out", None, "Output: a .safetensors or .pth file, or a params directory.", **define
  )
  flags.DEFINE_enum("arch", None, torch_mapping.ARCHS, "Backbone architecture.", **define)
  flags.DEFINE_integer("patch", None, "ViT patch size, checked against the weights.", **define)
  flags.DEFINE_string(
      "key",
      None,
      "Network inside a training checkpoint, e.g. 'teacher' for DINO's checkpoint.pth.",
      **define,
  )
  flags.DEFINE_enum(
      "which",
      "teacher",
      ["teacher", "student"],
      "With --from=flax on a training checkpoint: the network to export.",
      **define,
  )
  flags.mark_flags_as_required(["from", "in", "out", "arch"], flag_values=flag_values)


def _run(fv: flags.FlagValues) -> int:
  out = fv["out"].value
  meta = convert(
      fv["from"].value,
      fv["in"].value,
      out,
      fv["arch"].value,
      fv["patch"].value,
      fv["key"].value,
      fv["which"].value,
  )
  print(f"Wrote {out} ({output_format(out)}, {meta['arch']}) from {fv['in'].value}.")
  if output_format(out) == "flax":
    # Overrides cannot remove keys: a config for another backbone keeps that one's options.
    print(
        "Matching model (over a config for the same backbone, e.g. configs/fashion_mnist.py"
        ":resnet18 for a ResNet): "
        + " ".join(config_overrides(meta))
    )
  else:
    print("timm / torchvision layout without the classifier: load_state_dict(..., strict=False).")
  if meta.get("ignored_keys"):
    print(f"Ignored (no counterpart in the backbone): {', '.join(meta['ignored_keys'])}")
  return 0


def cli(argv: Sequence[str]) -> int:
  """Runs the command line `argv` (flags only, no program name) with its own flag values."""
  flag_values = flags.FlagValues()
  _define_flags(flag_values)
  flag_values(["convert", *argv])
  return _run(flag_values)


def main(argv: Sequence[str]) -> int:
  """The absl entry point: errors are one line on stderr and exit status 1."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  utils.quiet_absl_logging()
  try:
    return _run(flags.FLAGS)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"convert: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  _define_flags(flags.FLAGS)  # only here: importing the module defines no global flags
  app.run(main)
