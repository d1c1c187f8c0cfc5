"""The Microscopy Transformer (MiT): a pixel-space DiT with RMSNorm, adaLN modulation, projection dropout
and U-ViT long skips (arXiv 2603.26790; ARCHITECTURE.md section 3).

Per block, with c the conditioning vector and (shift, scale, gate) = SiLU -> Linear(D, 6D) of c:
    x = x + gate_msa * dropout(proj(attn(modulate(rmsnorm(x), shift_msa, scale_msa))))
    x = x + gate_mlp * mlp(modulate(rmsnorm(x), shift_mlp, scale_mlp))
    modulate(h, shift, scale) = h * (1 + scale) + shift
Long skips: the outputs of blocks 0 .. depth/2 - 1 are pushed on a stack; before each block of the second
half, x = Linear(2D -> D)(rmsnorm(cat([x, skip]))) with a popped skip (the first merge pairs the middle
block's output with itself).
Conditioning: c = t_emb + y_emb + e_emb + ct_emb (time, perturbation, experiment, cell type); each label
table has one extra null row, and each label is dropped to null with p = label_dropout in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phenoflow.config_validate import MODEL_SIZES
from phenoflow.model.conditioning import null_labels
from phenoflow.model.layers import (
    attention,
    gated_residual,
    modulated_rmsnorm,
    skip_merge,
)

LABEL_GROUPS = ("perturbation", "experiment", "cell_type")

# depth, hidden width, heads (DiT shapes; "tiny" is for CPU work, "XL-h64" is XL with 18 heads of 64). The table
# lives with the config's validation (which must not import torch); the model reads it from there.
MIT_SIZES: dict[str, tuple[int, int, int]] = MODEL_SIZES
DATA_T_EPS = 0.05  # model.prediction=data: the floor of 1 - t in v = (x1_hat - x_t) / (1 - t) (JiT's value)


@dataclass
class MiTShape:
    image_size: int = 96
    in_channels: int = 6
    patch_size: int = 2
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_perturbations: int = 0
    num_experiments: int = 0
    num_cell_types: int = 0
    label_dropout: float = 0.15
    proj_dropout: float = 0.1
    long_skip: bool = True
    kernels: str = "torch"
    attn_backend: str = "auto"
    prediction: str = "velocity"  # velocity | data (config_schema.ModelConfig.prediction)
    output_conv: int = 0  # K > 0: a convolutional output head of K channels (OutputConv); 0: the paper's linear one

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (grid*grid, dim): half the channels encode rows, half columns,
    each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4))."""
    assert dim % 4 == 0, "hidden size must be divisible by 4 for the 2D sin-cos embedding"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def embed(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([embed(xs), embed(ys)], axis=1)).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features [cos(t w_k), sin(t w_k)], w_k = 10000^(-k/half), -> Linear-SiLU-Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """qkv Linear (with bias) -> multi-head attention (no weight dropout) -> output projection."""

    def __init__(self, dim: int, num_heads: int, backend: str, kernels: str):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} not divisible by {num_heads} heads"
        self.num_heads, self.backend, self.kernels = num_heads, backend, kernels
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attention(self.qkv(x), self.num_heads, self.backend, self.kernels))


class MiTBlock(nn.Module):
    def __init__(self, s: MiTShape, merges_skip: bool):
        super().__init__()
        D = s.hidden_size
        self.kernels, self.proj_dropout = s.kernels, s.proj_dropout
        self.attn = Attention(D, s.num_heads, s.attn_backend, s.kernels)
        self.mlp = Mlp(D, int(D * s.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.skip_linear = nn.Linear(2 * D, D) if merges_skip else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kernels
        if self.skip_linear is not None:
            x = skip_merge(x, skip, self.skip_linear.weight, self.skip_linear.bias, kernels=k)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        p = self.proj_dropout if self.training else 0.0
        x = gated_residual(x, self.attn(modulated_rmsnorm(x, shift_msa, scale_msa, k)), gate_msa, p, k)
        x = gated_residual(x, self.mlp(modulated_rmsnorm(x, shift_mlp, scale_mlp, k)), gate_mlp, 0.0, k)
        return x


class FinalLayer(nn.Module):
    """Linear(modulate(rmsnorm(x), shift, scale)) -> patch pixels; (shift, scale) = SiLU -> Linear(D, 2D) of c."""

    def __init__(self, D: int, patch: int, out_channels: int, kernels: str):
        super().__init__()
        self.kernels = kernels
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulated_rmsnorm(x, shift, scale, self.kernels))


class OutputConv(nn.Module):
    """Optional output head after unpatchify: y = Conv3x3(SiLU(Conv3x3(z))), z (B, K, H, W) the K-channel
    patches of the final layer, y (B, C, H, W). The linear decoder draws each p x p patch from its own token
    only, so patch seams show until the model is well trained (the CPU demo at patch 4: 4 x 4 blocks); two
    3 x 3 convolutions let neighbouring patches agree at their borders (U-ViT's extra 3 x 3 convolution, Bao et
    al. 2023, widened to K channels). Default init: the final layer is zero-initialised, so y starts at 0."""

    def __init__(self, K: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(K, K, 3, padding=1)
        self.conv2 = nn.Conv2d(K, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.conv1(z)))


class MiT(nn.Module):
    """Velocity field v(x_t, t, labels) for images x (B, C, H, W) on [-1, 1]-scaled pixels."""

    def __init__(self, shape: MiTShape):
        super().__init__()
        s = self.shape = shape
        D, p = s.hidden_size, s.patch_size
        if s.image_size % p:
            raise ValueError(f"image_size {s.image_size} is not divisible by patch_size {p}")
        if s.long_skip and s.depth % 2:
            raise ValueError(f"long skips need an even depth, got {s.depth}")
        self.grid = s.image_size // p
        self.x_embedder = nn.Conv2d(s.in_channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(D)
        self.num_classes = {"perturbation": s.num_perturbations, "experiment": s.num_experiments,
                            "cell_type": s.num_cell_types}
        # One table per label group with an extra null row at index num_classes.
        self.label_embedders = nn.ModuleDict(
            {g: nn.Embedding(n + 1, D) for g, n in self.num_classes.items() if n > 0})
        half = s.depth // 2
        self.blocks = nn.ModuleList(
            [MiTBlock(s, merges_skip=s.long_skip and i >= half) for i in range(s.depth)])
        self.final_layer = FinalLayer(D, p, s.output_conv or s.in_channels, s.kernels)
        self.output_conv = OutputConv(s.output_conv, s.in_channels) if s.output_conv else None
        # Optional molecule adaptor (phenoflow/model/molecule_adaptor.py): replaces the perturbation embedding of
        # labels with a molecule vector; attached after construction by attach_adaptor / attach_from_state.
        self.mol_adaptor: nn.Module | None = None
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's scheme: xavier-uniform Linear weights with zero bias, N(0, 0.02) embeddings and time MLP,
        # zero-initialised adaLN and output layers (each block starts as the identity).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):  # the patch embedding (re-initialised below) and the output head's
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for emb in self.label_embedders.values():
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- labels ---------------------------------------------------------------------------------------
    def null_index(self, group: str) -> int:
        return self.num_classes[group]

    def null_labels(self, labels: dict[str, torch.Tensor], groups=("perturbation",)) -> dict[str, torch.Tensor]:
        """A copy of labels with the given groups set to their null row (for classifier-free guidance)."""
        return null_labels(labels, groups, self.num_classes)

    def embed_labels(self, labels: dict[str, torch.Tensor], batch: int, device) -> torch.Tensor:
        c = 0
        for g, emb in self.label_embedders.items():
            y = labels.get(g)
            if y is None:  # a missing group is unconditional
                y = torch.full((batch,), self.null_index(g), dtype=torch.long, device=device)
            # Range check in eager mode only: a data-dependent branch would break a compiled graph.
            if not torch.compiler.is_compiling() and (y.min() < 0 or y.max() > self.null_index(g)):
                raise ValueError(f"label {g} out of range [0, {self.null_index(g)}]: {y.min().item()}..{y.max().item()}")
            if self.training and self.shape.label_dropout > 0:
                # Each label independently dropped to null with p = label_dropout (gives CFG).
                drop = torch.rand(batch, device=device) < self.shape.label_dropout
                y = torch.where(drop, torch.full_like(y, self.null_index(g)), y)
            e = emb(y)
            if g == "perturbation" and self.mol_adaptor is not None:  # e_y = adaptor(m_y, dose) (its eq. 5, 6)
                e = self.mol_adaptor(y, labels.get("dose"), e, emb.weight[-1])
            c = c + e
        return c

    # ---- forward --------------------------------------------------------------------------------------
    def patchify(self, x):
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed

    def unpatchify(self, x):
        """(B, T, p*p*C) -> (B, C, H, W) (C = K channels with the output convolutions)."""
        B, p, g, C = x.shape[0], self.shape.patch_size, self.grid, self.shape.output_conv or self.shape.in_channels
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        h = self.patchify(x)
        c = self.t_embedder(t) + self.embed_labels(labels or {}, B, x.device)
        half, skips = len(self.blocks) // 2, []
        for i, blk in enumerate(self.blocks):
            if self.shape.long_skip and i >= half:
                h = blk(h, c, skips.pop())
            else:
                h = blk(h, c)
            if self.shape.long_skip and i < half:
                skips.append(h)
        out = self.unpatchify(self.final_layer(h, c))
        if self.output_conv is not None:
            out = self.output_conv(out)
        if self.shape.prediction == "data":
            # x-prediction (JiT): out = x1_hat; on the linear path x_t = (1 - t) x0 + t x1, so the velocity
            # x1 - x0 = (x1 - x_t) / (1 - t); 1 - t is floored at DATA_T_EPS (t = 1 is a solver end point).
            return (out - x) / (1 - t.to(out.dtype)).clamp_min(DATA_T_EPS).view(B, 1, 1, 1)
        return out


def model_shape(cfg, vocab_sizes: dict[str, int] | None = None) -> MiTShape:
    """MiTShape from a Config: size preset, per-field overrides, image shape from the data section,
    label table sizes from the data's vocabularies (a config value, when set, must cover the vocabulary)."""
    m = cfg.model
    if m.size not in MIT_SIZES:
        raise ValueError(f"model.size={m.size!r} is not one of {list(MIT_SIZES)}")
    depth, hidden, heads = MIT_SIZES[m.size]
    counts = {}
    for g, field_name in (("perturbation", "num_perturbations"), ("experiment", "num_experiments"),
                          ("cell_type", "num_cell_types")):
        n_cfg, n_vocab = getattr(m, field_name), (vocab_sizes or {}).get(g, 0)
        if n_cfg and n_vocab > n_cfg:
            raise ValueError(f"model.{field_name}={n_cfg} is smaller than the data's {g} vocabulary ({n_vocab})")
        counts[field_name] = n_cfg or n_vocab
    return MiTShape(
        image_size=cfg.data.image_size, in_channels=cfg.data.channels, patch_size=m.patch_size,
        depth=m.depth or depth, hidden_size=m.hidden_size or hidden, num_heads=m.num_heads or heads,
        mlp_ratio=m.mlp_ratio, label_dropout=m.label_dropout, proj_dropout=m.proj_dropout,
        long_skip=m.long_skip, kernels=m.kernels, attn_backend=m.attn_backend, prediction=m.prediction,
        output_conv=m.output_conv, **counts)


def build_model(cfg, vocab_sizes: dict[str, int] | None = None) -> MiT:
    return MiT(model_shape(cfg, vocab_sizes))
