"""Small PyTorch reference models with timm's ViT and torchvision's ResNet state_dict layout.

timm and torchvision are not test dependencies (their wheels pull a CUDA build of torch), so
the conversion tests use these modules: the same key names and shapes as
`timm.create_model('vit_small_patch16_224')` and `torchvision.models.resnet50()`, and the
same computation (pre-norm ViT with fused qkv, LayerNorm eps 1e-6, exact GELU, CLS token and
1 + N learned position embeddings; ResNet v1.5 bottlenecks with BatchNorm eps 1e-5).
"""

import torch
from torch import nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------- ViT


class PatchEmbed(nn.Module):

  def __init__(self, patch, channels, dim):
    super().__init__()
    self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches


class Attention(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, heads, N, head_dim] each
    attn = (q @ k.transpose(-2, -1)) * (d // self.num_heads) ** -0.5
    x = attn.softmax(dim=-1) @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
  """timm-layout ViT; `forward_features` returns the normed tokens [B, 1 + N, D]."""

  def __init__(
      self,
      img_size=224,
      patch_size=16,
      in_chans=3,
      embed_dim=384,
      depth=12,
      num_heads=6,
      num_classes=1000,
  ):
    super().__init__()
    n = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, embed_dim) * 0.02)
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward_features(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


def vit_small_patch16_224(**kwargs):
  return VisionTransformer(embed_dim=384, depth=12, num_heads=6, **kwargs)


# ------------------------------------------------------------------------------ ResNet


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    width = planes
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class ResNet(nn.Module):
  """torchvision-layout ResNet; `forward_features` returns the last feature map."""

  def __init__(self, layers=(3, 4, 6, 3), num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.layer1 = self._make_layer(64, layers[0], 1)
    self.layer2 = self._make_layer(128, layers[1], 2)
    self.layer3 = self._make_layer(256, layers[2], 2)
    self.layer4 = self._make_layer(512, layers[3], 2)
    self.fc = nn.Linear(512 * 4, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def _make_layer(self, planes, blocks, stride):
    layers = [Bottleneck(self.inplanes, planes, stride)]
    self.inplanes = planes * 4
    layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward_features(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def forward(self, x):
    return self.fc(self.forward_features(x).mean(dim=(2, 3)))


def resnet50(**kwargs):
  return ResNet((3, 4, 6, 3), **kwargs)
