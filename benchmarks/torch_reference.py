"""A plain PyTorch BITS train step: the baseline that benchmarks/train_step.py times ours against.

Written the way the authors' PyTorch code base (DINO / SimDINO) runs a step, with the model,
loss and update of bits_jax:
  * ViT: pre-norm blocks, fused qkv, explicit softmax attention (DINO's `Attention`; or
    `F.scaled_dot_product_attention` with `fused_attention=True`), LayerNorm eps 1e-6, exact
    GELU (tanh with `gelu_approximate=True`), CLS token, learned position embeddings for the
    patches only (bilinear, antialiased resize for other crop sizes, as `jax.image.resize`);
  * head: (layers - 1) x (Linear + GELU), a linear bottleneck, a linear map to the bit logits
    (`bits_jax.models.heads.BitsHead`);
  * multi-crop wrapper: crops of one resolution go through the backbone together, the
    teacher sees the global crops only (no grad);
  * loss: mean over (teacher global view g, student view v != g) of the element-wise BCE with
    the teacher's messages 1[a_t > 0], minus coding_rate_weight * (d + n) / (d n) times the
    mean over global views of 0.5 logdet(I + d / (n eps) Zn^T Zn) (the smaller Gram);
  * update: global-norm gradient clipping, AdamW (weight decay on weights, not on biases,
    norms, position embeddings or the CLS token), EMA teacher; a non-finite loss stops the
    step (DINO checks `loss.item()` every step).

`load_flax_params(student, params)` copies our `{'backbone', 'head'}` params into it.
Tensors are NCHW (`images_to_torch` converts our NHWC arrays).
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------- model


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int, fused: bool = False):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.fused = fused
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, heads, N, head_dim] each
    if self.fused:
      x = F.scaled_dot_product_attention(q, k, v)
    else:
      x = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int, gelu_approximate: bool = False):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)
    self.approximate = "tanh" if gelu_approximate else "none"

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):

  def __init__(
      self,
      dim: int,
      num_heads: int,
      mlp_ratio: float = 4.0,
      gelu_approximate: bool = False,
      fused_attention: bool = False,
  ):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, fused_attention)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
  """`[B, C, H, W] -> [B, D]` normed CLS features; position embeddings on patches only."""

  def __init__(
      self,
      image_size: int,
      patch_size: int,
      channels: int,
      width: int,
      depth: int,
      num_heads: int,
      mlp_ratio: float = 4.0,
      gelu_approximate: bool = False,
      fused_attention: bool = False,
  ):
    super().__init__()
    self.patch_size = patch_size
    self.patch_embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
    grid = image_size // patch_size
    self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
    self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 1e-6)
    self.blocks = nn.ModuleList([
        Block(width, num_heads, mlp_ratio, gelu_approximate, fused_attention) for _ in range(depth)
    ])
    self.norm = nn.LayerNorm(width, eps=1e-6)

  def interpolate_pos_embed(self, h: int, w: int):
    n, d = self.pos_embed.shape[1:]
    side = int(round(math.sqrt(n)))
    if (h, w) == (side, side):
      return self.pos_embed
    grid = self.pos_embed.reshape(1, side, side, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, d)

  def forward(self, x):
    b, _, h, w = x.shape
    x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches
    x = x + self.interpolate_pos_embed(h // self.patch_size, w // self.patch_size)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)[:, 0]


class BitsHead(nn.Module):
  """`[B, D] -> [B, bits]`: (layers - 1) x (Linear + GELU), [a linear bottleneck,] logits.

  `bottleneck_dim=0` is the paper's head (D -> 2048 -> 2048 -> bits), as ours.
  """

  def __init__(
      self, width: int, bits: int, hidden_dim: int, bottleneck_dim: int = 0, num_layers: int = 3
  ):
    super().__init__()
    dims = [width] + [hidden_dim] * (num_layers - 1)
    self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
    self.bottleneck = nn.Linear(dims[-1], bottleneck_dim) if bottleneck_dim else None
    self.logits = nn.Linear(bottleneck_dim or dims[-1], bits)
    self.reset_parameters()

  def _linears(self) -> list[nn.Linear]:
    return list(self.hidden) + ([self.bottleneck] if self.bottleneck else []) + [self.logits]

  def reset_parameters(self):
    """Our head's init: truncated-normal(0.02) kernels (cut at +-2 std), zero biases."""
    for layer in self._linears():
      nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
      nn.init.zeros_(layer.bias)

  def forward(self, x):
    for layer in self.hidden:
      x = F.gelu(layer(x))
    if self.bottleneck is not None:
      x = self.bottleneck(x)
    return self.logits(x)


class MultiCropWrapper(nn.Module):
  """Backbone on each run of same-size crops, head on all features. -> [V, B, bits]."""

  def __init__(self, backbone: nn.Module, head: nn.Module):
    super().__init__()
    self.backbone = backbone
    self.head = head

  def forward(self, crops: Sequence[torch.Tensor]):
    feats = [
        self.backbone(torch.cat(list(group)))
        for _, group in itertools.groupby(crops, key=lambda c: c.shape[-2:])
    ]
    out = self.head(torch.cat(feats))
    return out.reshape(len(crops), crops[0].shape[0], -1)


def make_student(
    *,
    image_size: int,
    patch_size: int,
    channels: int,
    width: int,
    depth: int,
    num_heads: int,
    bits: int,
    head_hidden_dim: int,
    head_bottleneck_dim: int = 0,
    head_layers: int = 3,
    gelu_approximate: bool = False,
    fused_attention: bool = False,
) -> MultiCropWrapper:
  backbone = VisionTransformer(
      image_size,
      patch_size,
      channels,
      width,
      depth,
      num_heads,
      gelu_approximate=gelu_approximate,
      fused_attention=fused_attention,
  )
  head = BitsHead(width, bits, head_hidden_dim, head_bottleneck_dim, head_layers)
  return MultiCropWrapper(backbone, head)


# ------------------------------------------------------------------------- our weights


def _np(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def _linear(sd: dict, name: str, kernel, bias) -> None:
  """Flax kernel `[in, out]` -> torch weight `[out, in]`."""
  sd[f"{name}.weight"] = _np(kernel).T
  sd[f"{name}.bias"] = _np(bias)


def vit_state_dict(params: Mapping) -> dict:
  """Our ViT params -> this module's `VisionTransformer` state_dict (numpy).

  Attention: our `query/key/value` kernels `[D, heads, head_dim]` become the rows
  (q|k|v, head, head_dim) of the fused `qkv.weight [3 D, D]`; `out` `[heads, head_dim, D]`
  becomes `proj.weight [D, D]`. Conv kernels `[kh, kw, in, out]` -> `[out, in, kh, kw]`.
  """
  sd = {
      "cls_token": _np(params["cls_token"]),
      "pos_embed": _np(params["pos_embed"]),
      "patch_embed.weight": _np(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
      "patch_embed.bias": _np(params["patch_embed"]["bias"]),
  }
  depth = len([k for k in params if re.fullmatch(r"block\d+", k)])
  for i in range(depth):
    ours, t = params[f"block{i}"], f"blocks.{i}"
    attn = ours["attn"]
    width = _np(attn["query"]["kernel"]).shape[0]
    qkv = ("query", "key", "value")
    sd[f"{t}.attn.qkv.weight"] = np.concatenate(
        [_np(attn[n]["kernel"]).reshape(width, width).T for n in qkv]
    )
    sd[f"{t}.attn.qkv.bias"] = np.concatenate([_np(attn[n]["bias"]).reshape(width) for n in qkv])
    _linear(
        sd, f"{t}.attn.proj", _np(attn["out"]["kernel"]).reshape(width, width), attn["out"]["bias"]
    )
    for norm in ("norm1", "norm2"):
      sd[f"{t}.{norm}.weight"] = _np(ours[norm]["scale"])
      sd[f"{t}.{norm}.bias"] = _np(ours[norm]["bias"])
    for fc in ("fc1", "fc2"):
      _linear(sd, f"{t}.mlp.{fc}", ours["mlp"][fc]["kernel"], ours["mlp"][fc]["bias"])
  sd["norm.weight"], sd["norm.bias"] = _np(params["norm"]["scale"]), _np(params["norm"]["bias"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def head_state_dict(params: Mapping) -> dict:
  """Our BitsHead params (`dense0..`, [`bottleneck`,] `logits`) -> `BitsHead` state_dict."""
  hidden = sorted((k for k in params if re.fullmatch(r"dense\d+", k)), key=lambda k: int(k[5:]))
  sd = {}
  for i, name in enumerate(hidden):
    _linear(sd, f"hidden.{i}", params[name]["kernel"], params[name]["bias"])
  for name in ("bottleneck", "logits"):
    if name in params:  # the paper's head has no bottleneck
      _linear(sd, name, params[name]["kernel"], params[name]["bias"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def load_flax_params(student: MultiCropWrapper, params: Mapping) -> None:
  """Copies our `{'backbone': ViT params, 'head': BitsHead params}` into `student`."""
  sd = {f"backbone.{k}": v for k, v in vit_state_dict(params["backbone"]).items()}
  sd.update({f"head.{k}": v for k, v in head_state_dict(params["head"]).items()})
  student.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)


def images_to_torch(views: np.ndarray) -> list[torch.Tensor]:
  """Our `[B, V, H, W, C]` views -> V tensors `[B, C, H, W]`."""
  views = np.asarray(views, np.float32)
  return [
      torch.from_numpy(np.ascontiguousarray(views[:, v].transpose(0, 3, 1, 2)))
      for v in range(views.shape[1])
  ]


# -------------------------------------------------------------------------------- loss


def coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
  """0.5 logdet(I + d / (n eps) Zn^T Zn) for `z: [n, d]`, with the smaller Gram matrix."""
  n, d = z.shape
  with torch.autocast(z.device.type, enabled=False):  # the log-det in float32 under bf16
    zn = F.normalize(z.float(), dim=-1, eps=1e-12)
    gram = zn.T @ zn if d <= n else zn @ zn.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * torch.logdet(eye + d / (n * eps) * gram)


def bits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    bce_weight: float = 1.0,
    coding_rate_weight: float = 0.1,
    eps: float = 0.05,
) -> tuple[torch.Tensor, dict]:
  """(loss, {'bce', 'coding_rate'}).

  student_logits: [V, B, bits], global views first; teacher_logits: [G, B, bits].
  """
  num_global, num_views = teacher_logits.shape[0], student_logits.shape[0]
  messages = (teacher_logits > 0).float()
  student_logits = student_logits.float()
  bce = [
      F.binary_cross_entropy_with_logits(student_logits[v], messages[g])
      for g in range(num_global)
      for v in range(num_views)
      if v != g
  ]
  bce = torch.stack(bce).mean()
  n, d = student_logits.shape[1:]
  rate = torch.stack([coding_rate(student_logits[g], eps) for g in range(num_global)]).mean()
  loss = bce_weight * bce - coding_rate_weight * (d + n) / (d * n) * rate
  return loss, {"bce": bce.detach(), "coding_rate": rate.detach()}


# -------------------------------------------------------------------------------- step


def _param_groups(student: nn.Module):
  decay, no_decay = [], []
  for name, p in student.named_parameters():
    skip = p.ndim < 2 or name.split(".")[-1] in ("pos_embed", "cls_token")
    (no_decay if skip else decay).append(p)
  return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class BitsTrainer:
  """Student, EMA teacher, AdamW; `step(global_crops, local_crops)` is one update.

  `autocast_dtype=torch.bfloat16` runs the forward passes under autocast (params, optimizer
  and the log-det stay float32), as the authors' mixed-precision training does.
  """

  def __init__(
      self,
      student: MultiCropWrapper,
      *,
      learning_rate: float = 5e-4,
      weight_decay: float = 0.04,
      teacher_momentum: float = 0.996,
      grad_clip_norm: float = 3.0,
      bce_weight: float = 1.0,
      coding_rate_weight: float = 0.1,
      eps: float = 0.05,
      betas: tuple[float, float] = (0.9, 0.999),
      autocast_dtype: torch.dtype | None = None,
  ):
    self.student = student
    self.autocast_dtype = autocast_dtype
    self.teacher = copy.deepcopy(student)
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.optimizer = torch.optim.AdamW(
        _param_groups(student), lr=learning_rate, weight_decay=weight_decay, betas=betas
    )
    self.teacher_momentum = teacher_momentum
    self.grad_clip_norm = grad_clip_norm
    self.loss_kwargs = dict(bce_weight=bce_weight, coding_rate_weight=coding_rate_weight, eps=eps)
    self._student_fn, self._teacher_fn = self.student, self.teacher

  def compile(self, **kwargs) -> None:
    """Runs student and teacher through `torch.compile` (forward and backward graphs)."""
    self._student_fn = torch.compile(self.student, **kwargs)
    self._teacher_fn = torch.compile(self.teacher, **kwargs)

  def set_hyperparams(self, learning_rate: float, weight_decay: float, momentum: float):
    """Per-iteration schedule values, as DINO sets them from precomputed arrays."""
    for i, group in enumerate(self.optimizer.param_groups):
      group["lr"] = learning_rate
      if i == 0:
        group["weight_decay"] = weight_decay
    self.teacher_momentum = momentum

  def step(
      self, global_crops: Sequence[torch.Tensor], local_crops: Sequence[torch.Tensor] = ()
  ) -> dict:
    device = global_crops[0].device.type
    with torch.autocast(
        device, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
    ):
      with torch.no_grad():
        teacher_logits = self._teacher_fn(global_crops)
      student_logits = self._student_fn(list(global_crops) + list(local_crops))
      loss, parts = bits_loss(student_logits, teacher_logits, **self.loss_kwargs)
    if not math.isfinite(loss.item()):
      raise FloatingPointError(f"loss is {loss.item()}: stopping, as DINO does.")
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip_norm > 0:
      nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    with torch.no_grad():
      m = self.teacher_momentum
      teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
      torch._foreach_mul_(teacher, m)  # pylint: disable=protected-access
      torch._foreach_add_(teacher, student, alpha=1.0 - m)  # pylint: disable=protected-access
    return dict(parts, loss=loss.detach())
