"""Conditioning for the U-Net and MLP velocity fields: one vector c (B, D) from time, labels and dose.

    c = t_emb(t) + sum_g e_g(y_g) + [y_pert not null] * d_emb(dose)                                   (1)

Time (t in [0, 1]; scaled by `time_scale` = 1000 as in ADM/DiT so that the frequencies span many periods):
    phi(t) = [cos(s t w_k), sin(s t w_k)],  w_k = 10000^(-k / half),  k < half = freq_dim / 2
    t_emb  = Linear(D, D)(SiLU(Linear(freq_dim, D)(phi(t))))                                          (2)

Labels. `labels[g]` holds integer ids for group g (perturbation, cell_type, dataset, ...), in one of two forms:
  - (B,)   one id per sample: a one-hot condition;
  - (B, K) up to K component ids per sample, padded with -1: a combination `A+B` is [a, b, -1, ...].
Ids run over [0, n_g); id n_g is the group's NULL row; -1 is padding. Each group embeds as
    e_g(y) = null_g                               if y holds no component in [0, n_g) (all -1 / null),
           = sum_{i in y, 0 <= i < n_g} u_g(i)    otherwise,                                          (3)
    u_g(i) = W_g[i] (learned table, one row per label) + P_g(F_g[i]) (optional fixed embedding matrix
             F_g (n_g, E), e.g. gene embeddings or Morgan fingerprints, through P_g = Linear-SiLU-Linear).
So a combination embeds as the sum of its components, and the NULL row is what remains when every component
is dropped. A missing group is unconditional (null). In training each sample's whole group is dropped to null
independently with probability p_g (`label_dropout`, a float or a per-group dict): classifier-free guidance.
A float multi-hot matrix converts with `multihot_to_ids`.

Dose (optional; `labels["dose"]`, float (B,), e.g. uM): d = dose * dose_scale (after log1p when dose_log),
d_emb = Linear(D, D)(SiLU(Linear(1, D)(d))). Dose belongs to the perturbation: it is zeroed when the
perturbation is null (dropped or nulled for guidance), so the null branch of CFG carries no dose information.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DOSE_KEY = "dose"
PERTURBATION = "perturbation"


def multihot_to_ids(multihot: Tensor, max_components: int) -> Tensor:
    """(B, n) multi-hot (0/1) -> (B, K) ids padded with -1 (K = max_components; extra components refused)."""
    if not torch.compiler.is_compiling() and int(multihot.ne(0).sum(1).max()) > max_components:
        raise ValueError(f"a row of the multi-hot matrix has more than {max_components} components")
    n = multihot.shape[1]
    idx = torch.arange(n, device=multihot.device).expand_as(multihot)
    key = torch.where(multihot != 0, idx, idx + n)  # present components first, in id order
    order = key.sort(dim=1).values[:, :max_components]
    return torch.where(order < n, order, torch.full_like(order, -1))



def null_labels(labels: dict[str, Tensor], groups, num_classes: dict[str, int]) -> dict[str, Tensor]:
    """A copy of `labels` with each group in `groups` set to its null id (index n_g, the table's extra row),
    whatever its shape ((B,) ids or (B, K) components). Shared by MiT and the expression models."""
    out = dict(labels)
    for g in groups:
        if g not in num_classes:
            raise KeyError(f"unknown label group {g!r}; known: {list(num_classes)}")
        if g in out:
            out[g] = torch.full_like(out[g], num_classes[g])
    return out

class TimeEmbedding(nn.Module):
    """Equation (2)."""

    def __init__(self, dim: int, freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.time_scale)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1).to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Equation (3) for one group: a learned table with an extra NULL row (index n), an optional fixed matrix."""

    def __init__(self, num_classes: int, dim: int, fixed: Tensor | None = None, learned: bool = True):
        super().__init__()
        if fixed is not None and fixed.shape[0] != num_classes:
            raise ValueError(f"fixed embedding matrix has {fixed.shape[0]} rows for {num_classes} labels")
        if not learned and fixed is None:
            raise ValueError("a label group needs a learned table, a fixed embedding matrix, or both")
        self.num_classes, self.learned = num_classes, learned
        # Row n is the null row; without a learned table the table holds the null row only (index 0).
        self.table = nn.Embedding(num_classes + 1 if learned else 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        if fixed is not None:
            self.register_buffer("fixed", fixed.detach().float().clone())
            self.proj = nn.Sequential(nn.Linear(fixed.shape[1], dim), nn.SiLU(), nn.Linear(dim, dim))
        else:
            self.fixed, self.proj = None, None

    def null_embedding(self) -> Tensor:
        return self.table.weight[-1]

    def component(self, ids: Tensor) -> Tensor:
        """u(i) for ids in [0, n) (callers clamp padding/null ids first and mask them out)."""
        out = self.table(ids) if self.learned else 0
        if self.proj is not None:
            out = out + self.proj(self.fixed[ids].to(self.proj[0].weight.dtype))
        return out

    def forward(self, y: Tensor, drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """y (B,) or (B, K) ids; drop (B,) bool -> (embedding (B, D), is_null (B,) bool)."""
        n = self.num_classes
        if not torch.compiler.is_compiling() and y.numel() and (y.min() < -1 or y.max() > n):
            raise ValueError(f"label ids out of range [-1, {n}] (-1 padding, {n} null): "
                             f"{y.min().item()}..{y.max().item()}")
        y2 = y[:, None] if y.ndim == 1 else y
        valid = (y2 >= 0) & (y2 < n)
        comp = self.component(torch.where(valid, y2, torch.zeros_like(y2)))  # (B, K, D)
        summed = (comp * valid[..., None].to(comp.dtype)).sum(1)
        is_null = ~valid.any(1)
        if drop is not None:
            is_null = is_null | drop
        return torch.where(is_null[:, None], self.null_embedding().to(summed.dtype).expand_as(summed), summed), is_null


class Conditioning(nn.Module):
    """Equation (1): c = t_emb + label embeddings + dose embedding, for the U-Net and the MLP."""

    def __init__(self, dim: int, vocab_sizes: dict[str, int], label_dropout: float | dict[str, float] = 0.15,
                 fixed_embeddings: dict[str, Tensor] | None = None, learned_tables: bool | dict[str, bool] = True,
                 dose: bool = False, dose_scale: float = 1.0, dose_log: bool = False,
                 freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        fixed_embeddings = fixed_embeddings or {}
        unknown = set(fixed_embeddings) - set(vocab_sizes)
        if unknown:
            raise ValueError(f"fixed embeddings for unknown label groups {sorted(unknown)}")
        self.num_classes = {g: int(n) for g, n in vocab_sizes.items() if n > 0}
        if DOSE_KEY in self.num_classes:
            raise ValueError(f"{DOSE_KEY!r} is reserved for the dose scalar")
        drops = label_dropout if isinstance(label_dropout, dict) else {g: label_dropout for g in self.num_classes}
        self.label_dropout = {g: float(drops.get(g, 0.0)) for g in self.num_classes}
        # learned_tables=False drops the learned table of the groups that have a fixed embedding matrix.
        learned = (learned_tables if isinstance(learned_tables, dict)
                   else {g: learned_tables or g not in fixed_embeddings for g in self.num_classes})
        self.time = TimeEmbedding(dim, freq_dim, time_scale)
        self.labels = nn.ModuleDict({g: LabelEmbedding(n, dim, fixed_embeddings.get(g), learned.get(g, True))
                                     for g, n in self.num_classes.items()})
        self.dose_scale, self.dose_log = dose_scale, dose_log
        self.dose = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim)) if dose else None

    def null_index(self, group: str) -> int:
        return self.num_classes[group]

    def null_labels(self, labels: dict[str, Tensor], groups=(PERTURBATION,)) -> dict[str, Tensor]:
        """A copy of labels with the given groups set to null (every component = the null id; same shape)."""
        return null_labels(labels, groups, self.num_classes)

    def forward(self, t: Tensor, labels: dict[str, Tensor] | None, batch: int) -> Tensor:
        labels = labels or {}
        c = self.time(t)
        pert_null = None
        for g, emb in self.labels.items():
            y = labels.get(g)
            if y is None:  # a missing group is unconditional
                y = torch.full((batch,), self.null_index(g), dtype=torch.long, device=t.device)
            drop = None
            if self.training and self.label_dropout[g] > 0:
                drop = torch.rand(batch, device=t.device) < self.label_dropout[g]
            e, is_null = emb(y, drop)
            c = c + e.to(c.dtype)
            if g == PERTURBATION:
                pert_null = is_null
        if self.dose is not None and DOSE_KEY in labels:
            d = labels[DOSE_KEY].to(c.dtype).reshape(batch, 1)
            d = (torch.log1p(d) if self.dose_log else d) * self.dose_scale
            e = self.dose(d)
            if pert_null is not None:
                e = e * (~pert_null)[:, None].to(e.dtype)
            c = c + e
        return c
