"""An MLP velocity field over genes (the ablation baseline for the gene-axis U-Net); same conditioning and
signature, v(x_t, t, labels) with x (B, G).

    h_0 = Linear(G, W)(x)
    per block:  (scale, shift) = Linear(D, 2W)(SiLU(c))
                h = h + Linear_0(Dropout(SiLU(Linear(W, W)(SiLU(LN(h) * (1 + scale) + shift)))))
    v = Linear_0(G)(SiLU(LN(h)))
LN is LayerNorm without affine weights (FiLM supplies them); Linear_0 layers are zero-initialised, so each
block starts as the identity and v = 0 at initialisation, as in the U-Net.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from phenoflow.model.conditioning import Conditioning


class MLPBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * width))
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.film(c).to(h.dtype).chunk(2, dim=1)
        y = F.layer_norm(h, h.shape[-1:]) * (1 + scale) + shift
        return h + self.fc2(self.drop(F.silu(self.fc1(F.silu(y)))))


class ExpressionMLP(nn.Module):
    """Velocity field over genes: x (B, G) -> v (B, G)."""

    def __init__(self, num_genes: int, vocab_sizes: dict[str, int], width: int = 512, depth: int = 4,
                 dropout: float = 0.0, emb_dim: int | None = None, **conditioning):
        super().__init__()
        D = emb_dim or width
        self.num_genes = num_genes
        self.cond = Conditioning(D, vocab_sizes, **conditioning)
        self.inp = nn.Linear(num_genes, width)
        self.blocks = nn.ModuleList([MLPBlock(width, D, dropout) for _ in range(depth)])
        self.out = nn.Linear(width, num_genes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def num_classes(self) -> dict[str, int]:
        return self.cond.num_classes

    def null_index(self, group: str) -> int:
        return self.cond.null_index(group)

    def null_labels(self, labels, groups=("perturbation",)):
        return self.cond.null_labels(labels, groups)

    def forward(self, x: Tensor, t: Tensor, labels: dict[str, Tensor] | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_genes:
            raise ValueError(f"expected x of shape (B, {self.num_genes}), got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = self.cond(t, labels, x.shape[0])
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(F.silu(F.layer_norm(h, h.shape[-1:])))
