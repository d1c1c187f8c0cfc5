"""A U-Net velocity field written once for 1D (genes as positions) and 2D (images) signals.

dims=1: x (B, G) expression; each gene is a position, lifted to C channels by conv_in (1 -> C), plus a learned
per-gene embedding P (C, G) (the conv alone is translation-equivariant and could not tell genes apart, yet the
velocity of gene g depends on which gene g is). dims=2: x (B, C_in, H, W), the ADM U-Net (Dhariwal & Nichol
2021) that the MiT paper's Configs A-E used. The conditioning vector c (B, D) comes from `Conditioning`.

ResBlock (ADM, use_scale_shift_norm), FiLM from c:
    h = Conv(SiLU(GN(x)))
    (scale, shift) = Linear(D, 2C)(SiLU(c))
    h = Conv_0(Dropout(SiLU(GN(h) * (1 + scale) + shift)))          Conv_0 zero-initialised
    y = skip(x) + h                                                  skip = identity or 1x1 conv
Attention block: y = x + Proj_0(MHA(qkv(GN(x)))), Proj_0 zero-initialised; keys at padded positions masked.
Encoder: conv_in, then per level l (channels C * mult[l]) num_res_blocks ResBlocks (+ attention where asked),
then a stride-2 conv (not after the last level). Middle: ResBlock, [attention], ResBlock. Decoder: per level,
reversed, num_res_blocks + 1 ResBlocks each taking cat([h, skip]) of one popped encoder output, then
nearest-x2 + conv. Out: Conv_0(SiLU(GN(h))), zero-initialised, so v = 0 at initialisation.

Padding. Every spatial axis is zero-padded at its end to a multiple of f = 2^(levels - 1) and the output is
cropped back. Padded positions do not leak into real ones, whatever the padding holds or how long it is:
with m the validity mask at each resolution (m_{l+1} = maxpool2(m_l): a coarse position is real when one of
its children is), the input of every spatial-mixing operation (conv, down, up) is multiplied by m, GroupNorm
statistics are taken over real positions only,
    mu = sum(m x) / sum(m),  var = sum(m (x - mu)^2) / sum(m),
and attention never attends to a padded key. At the input resolution this equals the same network run on
the unpadded signal with zero "same" padding; the output at real positions is identical for any amount of
padding (tested). When no padding is needed the mask is skipped (plain GroupNorm, no multiplies).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phenoflow.model.conditioning import Conditioning

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask.to(x.dtype)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover only positions where mask (1, 1, *spatial) is 1; fp32 statistics."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        B, C, G = x.shape[0], x.shape[1], self.num_groups
        xs = x.float().reshape(B, G, C // G, -1)
        m = mask.float().reshape(1, 1, 1, -1)
        count = m.sum() * (C // G)
        mu = (xs * m).sum((2, 3), keepdim=True) / count
        var = (((xs - mu) * m) ** 2).sum((2, 3), keepdim=True) / count
        y = ((xs - mu) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, C) + (1,) * (x.ndim - 2)
        return (y * self.weight.float().reshape(shape) + self.bias.float().reshape(shape)).to(x.dtype)


def _norm(channels: int, groups: int) -> MaskedGroupNorm:
    return MaskedGroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        conv = _CONV[dims]
        self.norm1, self.conv1 = _norm(cin, groups), conv(cin, cout, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.norm2, self.drop = _norm(cout, groups), nn.Dropout(dropout)
        self.conv2 = _zero(conv(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else conv(cin, cout, 1)

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        h = self.conv1(_masked(F.silu(self.norm1(x, mask)), mask))
        scale, shift = self.film(c).to(h.dtype).chunk(2, dim=1)
        bshape = scale.shape + (1,) * (h.ndim - 2)
        h = self.norm2(h, mask) * (1 + scale.reshape(bshape)) + shift.reshape(bshape)
        h = self.conv2(_masked(self.drop(F.silu(h)), mask))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, dims: int, channels: int, head_channels: int, groups: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention channels {channels} not divisible by head_channels {head_channels}")
        self.heads = channels // head_channels
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        B, C = x.shape[:2]
        h = self.norm(x, mask).reshape(B, C, -1)
        q, k, v = self.qkv(h).reshape(B, 3, self.heads, C // self.heads, -1).transpose(-1, -2).unbind(1)
        attn_mask = None if mask is None else mask.reshape(1, 1, 1, -1).bool()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, hc)
        return x + self.proj(o.transpose(-1, -2).reshape(B, C, -1)).reshape(x.shape)


class Down(nn.Module):
    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, stride=2, padding=1)

    def forward(self, x, c, mask):
        return self.conv(_masked(x, mask))


class Up(nn.Module):
    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x, c, mask):  # mask: the finer resolution's
        return self.conv(_masked(F.interpolate(x, scale_factor=2, mode="nearest"), mask))


class UNet(nn.Module):
    """Velocity field v(x_t, t, labels); dims=1 takes (B, G) genes (num_genes set), dims=2 (B, C, H, W)."""

    def __init__(self, dims: int, vocab_sizes: dict[str, int], in_channels: int = 1, num_genes: int | None = None,
                 base_channels: int = 32, channel_mult=(1, 2, 4, 8), num_res_blocks: int = 2,
                 attention_levels=(), head_channels: int = 64, dropout: float = 0.0, norm_groups: int = 32,
                 emb_dim: int | None = None, mid_attention: bool | None = None, gene_embedding: bool = True,
                 **conditioning):
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        if dims == 1 and num_genes is None:
            raise ValueError("a 1D (gene) U-Net needs num_genes")
        conv, C0 = _CONV[dims], base_channels
        self.dims, self.num_genes, self.in_channels = dims, num_genes, in_channels
        self.levels = len(channel_mult)
        self.factor = 2 ** (self.levels - 1)
        D = emb_dim or 4 * C0
        self.cond = Conditioning(D, vocab_sizes, **conditioning)
        self.conv_in = conv(in_channels, C0, 3, padding=1)
        self.gene_embed = (nn.Parameter(torch.randn(C0, num_genes) * 0.1) if dims == 1 and gene_embedding
                           else None)
        res = lambda ci, co: ResBlock(dims, ci, co, D, dropout, norm_groups)
        attn = lambda ch: AttentionBlock(dims, ch, min(head_channels, ch), norm_groups)
        # Encoder: a flat list of (blocks, level of their input); every entry's output is pushed as a skip.
        self.down, self.down_level, skip_ch, ch = nn.ModuleList(), [], [C0], C0
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [res(ch, C0 * mult)]
                ch = C0 * mult
                if lvl in attention_levels:
                    blocks.append(attn(ch))
                self.down.append(nn.ModuleList(blocks))
                self.down_level.append(lvl)
                skip_ch.append(ch)
            if lvl < self.levels - 1:
                self.down.append(nn.ModuleList([Down(dims, ch)]))
                self.down_level.append(lvl)  # masks the input, at level lvl
                skip_ch.append(ch)
        use_mid_attn = (dims == 2) if mid_attention is None else mid_attention
        self.mid = nn.ModuleList([res(ch, ch)] + ([attn(ch)] if use_mid_attn else []) + [res(ch, ch)])
        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip; Up at the end of a level.
        self.up, self.up_level = nn.ModuleList(), []
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [res(ch + skip_ch.pop(), C0 * mult)]
                ch = C0 * mult
                if lvl in attention_levels:
                    blocks.append(attn(ch))
                if lvl > 0 and i == num_res_blocks:
                    blocks.append(Up(dims, ch))
                self.up.append(nn.ModuleList(blocks))
                self.up_level.append(lvl)
        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = _zero(conv(ch, in_channels, 3, padding=1))

    @property
    def blocks(self) -> list[nn.Module]:
        """The residual blocks in forward order: the units the engines shard (FSDP2), recompute (activation
        checkpointing) and compile, as the MiT's transformer blocks are (not a ModuleList: names unchanged)."""
        return [m for m in self.modules() if isinstance(m, ResBlock)]

    # ---- the image model's label API (classifier-free guidance) ---------------------------------------
    @property
    def num_classes(self) -> dict[str, int]:
        return self.cond.num_classes

    def null_index(self, group: str) -> int:
        return self.cond.null_index(group)

    def null_labels(self, labels, groups=("perturbation",)):
        return self.cond.null_labels(labels, groups)

    # ---- padding ---------------------------------------------------------------------------------------
    def pad(self, x: Tensor) -> tuple[Tensor, list[Tensor | None], tuple[int, ...]]:
        """(B, C, *S) -> zero-padded (B, C, *S') with S' multiples of f, the masks per level, S."""
        size = tuple(x.shape[2:])
        padded = tuple(-(-n // self.factor) * self.factor for n in size)
        if padded == size:
            return x, [None] * self.levels, size
        widths = [w for n, p in zip(reversed(size), reversed(padded)) for w in (0, p - n)]
        mask = F.pad(torch.ones((1, 1) + size, device=x.device, dtype=x.dtype), widths)
        masks = [mask]
        for _ in range(self.levels - 1):
            masks.append((F.max_pool1d if self.dims == 1 else F.max_pool2d)(masks[-1], 2))
        return F.pad(x, widths), masks, size

    def forward_padded(self, x: Tensor, masks: list[Tensor | None], t: Tensor, labels) -> Tensor:
        """The network on an already padded (B, C, *S') input; padded positions are ignored (see header)."""
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        c = self.cond(t, labels, B)
        h = self.conv_in(_masked(x, masks[0]))
        if self.gene_embed is not None:
            h = h + F.pad(self.gene_embed, (0, h.shape[-1] - self.gene_embed.shape[-1])).to(h.dtype)
        skips = [h]
        for blocks, lvl in zip(self.down, self.down_level):
            for blk in blocks:
                h = blk(h, c, masks[lvl])
            skips.append(h)
        for blk in self.mid:
            h = blk(h, c, masks[-1])
        for blocks, lvl in zip(self.up, self.up_level):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:
                h = blk(h, c, masks[lvl - 1] if isinstance(blk, Up) else masks[lvl])
        return self.conv_out(_masked(F.silu(self.norm_out(h, masks[0])), masks[0]))

    def forward(self, x: Tensor, t: Tensor, labels: dict[str, Tensor] | None = None) -> Tensor:
        if self.dims == 1:
            if x.ndim != 2 or x.shape[1] != self.num_genes:
                raise ValueError(f"expected x of shape (B, {self.num_genes}), got {tuple(x.shape)}")
            x = x[:, None]
        xp, masks, size = self.pad(x)
        out = self.forward_padded(xp, masks, t, labels)
        out = out[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]
        return out[:, 0] if self.dims == 1 else out


# ADM channel multipliers by image size (guided-diffusion's table; 96 -> (1, 2, 3, 4), our choice).
def adm_channel_mult(image_size: int) -> tuple[int, ...]:
    if image_size >= 256:
        return (1, 1, 2, 2, 4, 4)
    if image_size >= 128:
        return (1, 1, 2, 3, 4)
    if image_size >= 64:
        return (1, 2, 3, 4)
    return (1, 2, 2, 2)


def build_unet2d(image_size: int, in_channels: int, vocab_sizes: dict[str, int], **options) -> UNet:
    """The ADM U-Net for images (B, C, H, W): base 128, 2 ResBlocks per level, 64-channel heads, attention at
    every level below full resolution and in the middle, dropout 0.1; options override any UNet argument."""
    mult = options.pop("channel_mult", None) or adm_channel_mult(image_size)
    defaults = {"base_channels": 128, "num_res_blocks": 2, "head_channels": 64, "dropout": 0.1, "norm_groups": 32,
                    "attention_levels": tuple(range(1, len(mult)))}
    defaults.update(options)
    return UNet(2, vocab_sizes, in_channels=in_channels, channel_mult=tuple(mult), **defaults)
