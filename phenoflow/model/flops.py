"""FLOP model of a MiT training step (ARCHITECTURE.md section 6), counted from the model's shape.

Per image forward, in multiply-accumulates (MAC), with N tokens of width D, depth L, MLP ratio r:
    linear layers  N * L * (3 + 1 + 2 r) D^2          (qkv, attention projection, MLP)
    attention      L * 2 N^2 D                          (Q K^T and A V)
    long skips     N * (L/2) * 2 D^2                    (Linear(2D -> D) per merge)
    embed/final    N * p^2 C D * 2;  per image: adaLN  L * 6 D^2 + 2 D^2, time MLP 256 D + D^2
    output convs   (model.output_conv = K > 0) the final linear gives p^2 K instead of p^2 C values per token,
                   then H W * 9 (K K + K C) for the two 3x3 convolutions
Training = forward + backward = 3 x forward; 2 FLOP per MAC.  MiT-XL/2 at 96x96x6: about 8.7 TFLOP/image.
MFU is reported against 989 TFLOP/s (H100 dense bf16 peak), by this full count.
"""
from __future__ import annotations

H100_BF16_PEAK_FLOPS = 989e12


def forward_macs(shape) -> dict[str, float]:
    N, D, L, r = shape.num_tokens, shape.hidden_size, shape.depth, shape.mlp_ratio
    pix = shape.patch_size ** 2 * shape.in_channels
    skips = L // 2 if shape.long_skip else 0
    K = getattr(shape, "output_conv", 0)
    out_pix = shape.patch_size ** 2 * (K or shape.in_channels)
    hw = N * shape.patch_size ** 2
    return {
        "linear": N * L * (4 + 2 * r) * D * D,
        "attention": L * 2 * N * N * D,
        "skip": N * skips * 2 * D * D,
        "embed_final": N * pix * D + N * out_pix * D,
        "output_conv": hw * 9 * (K * K + K * shape.in_channels) if K else 0,
        "adaln": L * 6 * D * D + 2 * D * D,
        "time_mlp": 256 * D + D * D,
    }


def train_flops_per_image(shape) -> float:
    return 3 * 2 * sum(forward_macs(shape).values())


def mfu(images_per_s: float, shape, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    return images_per_s * train_flops_per_image(shape) / peak_flops
