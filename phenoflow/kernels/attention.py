"""Multi-head self-attention on the packed qkv projection, with a choice of backend.

Input: qkv (B, N, 3D), the output of the model's `Linear(D, 3D)`, whose last axis is laid out as
(3, H, d) = [q heads | k heads | v heads] with D = H * d. Output (B, N, D) = heads concatenated, ready for the
output projection. softmax(q k^T / sqrt(d)) v per head, no mask, no attention dropout.

Backends:
- "flash_attn": flash-attn's `flash_attn_qkvpacked_func` takes the (B, N, 3, H, d) view of qkv directly
  and returns (B, N, H, d): no copy in or out. Needs flash-attn installed, a CUDA tensor in fp16/bf16 on an
  Ampere-or-newer GPU (sm80+), d <= 256 and d % 8 == 0.
- "sdpa": torch's scaled_dot_product_attention picks flash / cuDNN / memory-efficient / math. q, k, v are
  passed as (B, H, N, d) strided views of qkv (last axis unit stride, which those kernels accept). The
  fused backends allocate their output as (B, N, H, d) in memory, so transposing back and merging heads
  is a view.
- "math": the explicit fp32 softmax(q k^T) v, as the reference.
- "auto": flash_attn when usable, else sdpa.
Note on d = 72 (MiT-XL's 16 heads): FlashAttention 2/3 pad d to the next kernel size (96), wasting a
quarter of attention's matrix work; the XL-h64 size (18 heads of 64, same width and parameters) avoids it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash_attn", "sdpa", "math")

try:  # optional: flash-attn builds only with CUDA
    from flash_attn import flash_attn_qkvpacked_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_qkvpacked_func = None


def flash_attn_usable(qkv: torch.Tensor, head_dim: int) -> bool:
    """True when flash-attn is installed and supports this tensor (device, dtype, GPU generation, d)."""
    if flash_attn_qkvpacked_func is None or not qkv.is_cuda:
        return False
    if qkv.dtype not in (torch.float16, torch.bfloat16) or head_dim > 256 or head_dim % 8:
        return False
    return torch.cuda.get_device_capability(qkv.device)[0] >= 8


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, int, int, int, int]:
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"attention: qkv must be (B, N, 3 * heads * d) with {num_heads} heads, "
                         f"got shape {tuple(qkv.shape)}")
    B, N, three_d = qkv.shape
    D = three_d // 3
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return qkv.view(B, N, 3, num_heads, D // num_heads), B, N, D, D // num_heads


def attention(qkv: torch.Tensor, num_heads: int, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head; qkv (B, N, 3D) packed as [q | k | v] x heads -> (B, N, D)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend={backend!r} is not one of {list(BACKENDS)}")
    qkv5, B, N, D, d = _split_heads(qkv, num_heads)
    if backend == "math":
        return attention_reference(qkv, num_heads).to(qkv.dtype)
    if backend == "flash_attn" and not flash_attn_usable(qkv, d):
        raise RuntimeError(
            "attention: backend='flash_attn' needs flash-attn installed and a CUDA fp16/bf16 tensor on an sm80+ GPU "
            f"with head dim <= 256 and a multiple of 8 (installed: {flash_attn_qkvpacked_func is not None}, "
            f"device: {qkv.device}, dtype: {qkv.dtype}, head dim: {d})")
    if backend in ("auto", "flash_attn") and flash_attn_usable(qkv, d):
        return flash_attn_qkvpacked_func(qkv5).view(B, N, D)  # (B, N, H, d) -> (B, N, D): a view
    # SDPA: (B, H, N, d) strided views, no copies.
    q, k, v = qkv5.permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(B, N, D)  # a view when the backend wrote (B, N, H, d) memory


def attention_reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """fp32 softmax(q k^T / sqrt(d)) v written out in full (B, H, N, N): the tests' ground truth."""
    qkv5, B, N, D, d = _split_heads(qkv, num_heads)
    q, k, v = qkv5.float().permute(2, 0, 3, 1, 4).unbind(0)
    w = torch.softmax((q @ k.transpose(-1, -2)) * d**-0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, N, D)
