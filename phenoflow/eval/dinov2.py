"""DINOv2 ViT-L/14 in plain torch, with the official state-dict key names: CLS features for FD/KD_DINOv2.

Architecture (facebookresearch/dinov2, the hub model dinov2_vitl14): patch 14, width 1024, depth 24, 16 heads,
MLP ratio 4 with exact GELU, pre-norm blocks with LayerNorm (eps 1e-6) and LayerScale:
    x = x + ls1 * attn(norm1(x));  x = x + ls2 * mlp(norm2(x))
learned position embeddings for a 37x37 patch grid (518 px) plus the CLS token, resampled bicubically for other
sizes (scale factor (n + 0.1) / 37, as the official code does); output: the final-norm CLS token (1024-d).
Keys: cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,
norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*, norm.*  (block_chunks = 0 layout, no register tokens).
Preprocessing (as torch-fidelity's DINOv2 extractor): RGB 8-bit values, TF1 bilinear resize to 224, ImageNet
mean/std normalisation. Weights: a local file (.pth with weights_only=True, or .safetensors); nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phenoflow.eval.inception import resize_bilinear_tf1
from phenoflow.eval.weights import load_into

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTShape:
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pos_grid: int = 37  # position-embedding grid of the pretrained weights (518 / 14)
    input_size: int = 224  # images are resized to this before the network


VIT_L14 = ViTShape()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, s: ViTShape):
        super().__init__()
        d = s.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, s.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * s.mlp_ratio))
        self.ls2 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, s: ViTShape):
        super().__init__()
        self.proj = nn.Conv2d(3, s.embed_dim, kernel_size=s.patch_size, stride=s.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class DINOv2(nn.Module):
    """forward(rgb on [0, 1], (B, 3, H, W)) -> (B, embed_dim) final-norm CLS features (float32)."""

    def __init__(self, shape: ViTShape = VIT_L14):
        super().__init__()
        s = self.shape = shape
        d = s.embed_dim
        self.patch_embed = PatchEmbed(s)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + s.pos_grid**2, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # used only in DINOv2 training; kept for strict loading
        self.blocks = nn.ModuleList([Block(s) for _ in range(s.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h w, D) for an h x w patch grid: the pretrained 37x37 grid resampled bicubically."""
        g = self.shape.pos_grid
        if (h, w) == (g, g):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        # The official code passes a scale factor (n + 0.1) / g (the 0.1 avoids rounding down the output size).
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        assert grid.shape[-2:] == (h, w), grid.shape
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(cls.dtype)
        return torch.cat([cls, grid], 1)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> 8-bit values -> TF1 bilinear resize to input_size -> ImageNet normalisation."""
        x = (rgb.float() * 255).round().clamp(0, 255)
        x = resize_bilinear_tf1(x, self.shape.input_size) / 255
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) input (H, W multiples of the patch size) -> final-norm CLS token."""
        p = self.shape.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"DINOv2 input size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = tokens + self.position_embedding(x.shape[-2] // p, x.shape[-1] // p)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"DINOv2 expects RGB (B, 3, H, W) on [0, 1], got shape {tuple(rgb.shape)}")
        return self.features(self.preprocess(rgb))


def load_dinov2(path: str | Path, shape: ViTShape = VIT_L14) -> DINOv2:
    """DINOv2 (default ViT-L/14) with weights from a local file, in eval mode without gradients."""
    net = load_into(DINOv2(shape), path)
    net.requires_grad_(False)
    return net.eval()


def num_params(shape: ViTShape) -> int:
    """Closed-form parameter count of DINOv2(shape) (used by tests as an independent check)."""
    d, p, h = shape.embed_dim, shape.patch_size, int(shape.embed_dim * shape.mlp_ratio)
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    return (3 * p * p * d + d) + d + (1 + shape.pos_grid**2) * d + d + shape.depth * block + 2 * d

