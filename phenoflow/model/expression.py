"""Builders for the expression velocity fields (gene-axis U-Net, MLP ablation) and the image U-Net.

Options are the keyword arguments of `UNet` / `ExpressionMLP` and of `Conditioning` (label_dropout,
fixed_embeddings, learned_tables, dose, dose_scale, dose_log, freq_dim, time_scale).
Gene U-Net defaults follow the unofficial PRiMeFlow shape reference: base 32, channel_mult (1, 2, 4, 8),
2 ResBlocks per level, no attention (about 5.75M parameters at 2,000 genes, 5.85M at 5,000). Its cost is far
above the MLP's: 3.5 GFLOP forward per cell at 2,000 genes (8.7 at 5,000; FLOPs double per level as channels
double and length halves) against 0.013 for the default MLP (width 512, depth 4; 6.7M parameters at 2,000
genes), so CPU runs (demo, tests) want a smaller shape, e.g. base 8-16 and channel_mult (1, 2) or (1, 2, 4).
"""
from __future__ import annotations

from torch import nn

from phenoflow.model.mlp import ExpressionMLP
from phenoflow.model.unet import UNet, build_unet2d

__all__ = ["build_expression_model", "build_unet2d"]


def build_expression_model(kind: str, num_genes: int, vocab_sizes: dict[str, int], **options) -> nn.Module:
    """kind "unet" -> the 1D U-Net over genes; "mlp" -> the MLP baseline. Both: forward(x (B, G), t, labels)."""
    if num_genes < 1:
        raise ValueError(f"num_genes must be positive, got {num_genes}")
    if kind == "unet":
        defaults = {"base_channels": 32, "channel_mult": (1, 2, 4, 8), "num_res_blocks": 2, "norm_groups": 8}
        defaults.update(options)
        return UNet(1, vocab_sizes, num_genes=num_genes, **defaults)
    if kind == "mlp":
        return ExpressionMLP(num_genes, vocab_sizes, **options)
    raise ValueError(f"unknown expression model kind {kind!r}; expected 'unet' or 'mlp'")
