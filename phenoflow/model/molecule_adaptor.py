"""The molecule adaptor (MiT paper section 5, ARCHITECTURE.md section 3): a molecule vector and a dose -> the
perturbation embedding of the MiT's conditioning vector c.

For a perturbation id y with molecule vector m_y (a row of the run's molecule table: Morgan fingerprint or a
precomputed embedding, width F) and dose d:
    s     = clamp((d - d_min) / (d_max - d_min), 0, 1)          min-max scaled dose; (d_min, d_max) stored here (1)
            (with mol.dose_log, d is log1p(dose) and the range is on that scale; the flag is stored too)
    c_d   = Linear(D, D)(SiLU(Linear(256, D)(phi(1000 s))))     sinusoidal dose embedding (conditioning.py (2)) (2)
    h_0   = Linear(F -> D)(m_y)                                 one token, (B, 1, D)                          (3)
    h_k   = MiTBlock_k(h_{k-1}, c_d),  k = 1..depth             adaLN-modulated by the dose only (mit.py)      (4)
    e_y   = e_null + W_o rmsnorm(h_depth) + b_o                 W_o, b_o zero-initialised                      (5)
where e_null is the base model's null perturbation row (label_embedders.perturbation.weight[-1]): at
initialisation every compound embeds as "perturbation unknown", i.e. the finetuned model starts exactly at the
pretrained model's unconditional prediction (the same rule as new labels in finetuning, docs/finetune.md), and
learns to move away from it. With one token, attention is the identity map of its value path, so the adaptor is
a deep dose-modulated MLP, as the paper notes.

Null path (classifier-free guidance and unconditional sampling): a null id (index n, after label dropout or
model.null_labels) embeds as
    e_null' = e_null + delta,   delta a learned vector, zero-initialised                                       (6)
so the unconditional branch stays the base model's (plus what finetuning learns).

Coexistence with one-hot labels: ids whose label has no molecule (`has_molecule` False: the control, or labels
without a compound) keep their one-hot row; ids with a molecule take (5). The switch is per run (`mol.conditioning`:
onehot | adaptor); the molecule table, the has-molecule mask and the dose range are persistent buffers, so an
export carries them and `attach_from_state` rebuilds the adaptor from the weights file alone.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phenoflow.model.conditioning import TimeEmbedding
from phenoflow.model.mit import MiT, MiTBlock, MiTShape

PREFIX = "mol_adaptor."


class MoleculeAdaptor(nn.Module):
    def __init__(self, table: Tensor, has_molecule: Tensor, dose_range: tuple[float, float], hidden: int,
                 depth: int = 6, num_heads: int = 4, mlp_ratio: float = 4.0, proj_dropout: float = 0.0,
                 kernels: str = "torch", attn_backend: str = "auto", dose_log: bool = False):
        super().__init__()
        n, width = table.shape
        if has_molecule.shape != (n,):
            raise ValueError(f"has_molecule {tuple(has_molecule.shape)} does not match the table's {n} rows")
        self.register_buffer("table", table.detach().float().clone())
        self.register_buffer("has_molecule", has_molecule.detach().bool().clone())
        self.register_buffer("dose_range", torch.tensor([float(dose_range[0]), float(dose_range[1])]))
        self.register_buffer("dose_log", torch.tensor(float(dose_log)))
        shape = MiTShape(hidden_size=hidden, num_heads=num_heads, mlp_ratio=mlp_ratio, proj_dropout=proj_dropout,
                         long_skip=False, kernels=kernels, attn_backend=attn_backend)
        self.embed_in = nn.Linear(width, hidden)                                   # (3)
        self.dose_embed = TimeEmbedding(hidden)                               # (2)
        self.blocks = nn.ModuleList([MiTBlock(shape, merges_skip=False) for _ in range(depth)])  # (4)
        self.proj_out = nn.Linear(hidden, hidden)                                  # (5)
        self.null_delta = nn.Parameter(torch.zeros(hidden))                   # (6)
        nn.init.xavier_uniform_(self.embed_in.weight)
        nn.init.zeros_(self.embed_in.bias)
        for blk in self.blocks:
            for m in blk.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)  # adaLN-zero: each block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.normal_(self.dose_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.dose_embed.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def num_labels(self) -> int:
        return self.table.shape[0]

    def scaled_dose(self, dose: Tensor | None, batch: int, device) -> Tensor:
        """(1): the dose min-max scaled to [0, 1] with the stored range (0 when no dose is given)."""
        if dose is None:
            return torch.zeros(batch, device=device)
        lo, hi = self.dose_range[0], self.dose_range[1]
        d = dose.float().reshape(batch)
        d = torch.where(self.dose_log > 0, torch.log1p(d.clamp_min(0.0)), d)
        return ((d - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)

    def embed(self, y: Tensor, dose: Tensor | None) -> Tensor:
        """(2)-(5) without the null row: W_o rmsnorm(h) + b_o for ids y (B,) in [0, n)."""
        c = self.dose_embed(self.scaled_dose(dose, y.shape[0], y.device))
        h = self.embed_in(self.table[y].to(self.embed_in.weight.dtype))[:, None]
        for blk in self.blocks:
            h = blk(h, c)
        return self.proj_out(F.rms_norm(h[:, 0], (h.shape[-1],), eps=1e-6))

    def forward(self, y: Tensor, dose: Tensor | None, onehot: Tensor, null_row: Tensor) -> Tensor:
        """The perturbation embedding (B, D): (5) for ids with a molecule, (6) for null ids, one-hot otherwise."""
        n = self.num_labels
        valid = y < n
        yc = torch.where(valid, y, torch.zeros_like(y))
        use = valid & self.has_molecule[yc]
        e_mol = null_row.to(onehot.dtype) + self.embed(yc, dose).to(onehot.dtype)
        e = torch.where(use[:, None], e_mol, onehot)
        return torch.where(valid[:, None], e, onehot + self.null_delta.to(onehot.dtype))


def adaptor_heads(hidden: int, want: int, model_heads: int) -> int:
    heads = want or model_heads
    if hidden % heads:
        raise ValueError(f"mol.adaptor_heads={heads} does not divide the hidden size {hidden}")
    return heads


def attach_adaptor(model: MiT, cfg, table: np.ndarray | Tensor, has_molecule, dose_range,
                   dose_log: bool | None = None) -> MoleculeAdaptor:
    """Give a MiT a molecule adaptor (mol section of cfg) over `table` (one row per perturbation id)."""
    s = model.shape
    if s.num_perturbations <= 0:
        raise ValueError("the molecule adaptor needs a perturbation label table in the model")
    t = torch.as_tensor(np.asarray(table), dtype=torch.float32)
    if t.shape[0] != s.num_perturbations:
        raise ValueError(f"molecule table has {t.shape[0]} rows for {s.num_perturbations} perturbation labels")
    mc = cfg.mol
    model.mol_adaptor = MoleculeAdaptor(
        t, torch.as_tensor(np.asarray(has_molecule)), dose_range, s.hidden_size, depth=mc.adaptor_depth,
        num_heads=adaptor_heads(s.hidden_size, mc.adaptor_heads, s.num_heads), mlp_ratio=s.mlp_ratio,
        proj_dropout=s.proj_dropout, kernels=s.kernels, attn_backend=s.attn_backend,
        dose_log=mc.dose_log if dose_log is None else dose_log)
    return model.mol_adaptor


def attach_from_state(model: MiT, cfg, state: dict[str, Tensor]) -> MoleculeAdaptor | None:
    """Rebuild the adaptor of an exported model from its weights (table, mask and dose range are buffers)."""
    if PREFIX + "table" not in state:
        return None
    log = state.get(PREFIX + "dose_log")
    return attach_adaptor(model, cfg, state[PREFIX + "table"], state[PREFIX + "has_molecule"],
                          tuple(state[PREFIX + "dose_range"].tolist()), None if log is None else bool(log.item()))
