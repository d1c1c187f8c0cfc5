"""Fused kernels around attention in a MiT block (one op per file: Triton kernels, launcher, autograd via
torch.library custom ops, fp32 reference).

- `modulated_rmsnorm(x, shift, scale, eps)`: rmsnorm(x) * (1 + scale) + shift
- `gated_residual(x, y, gate, p)`: x + gate * dropout(y, p), Philox mask regenerated in backward
- `skip_merge(x, skip, weight, bias, eps)`: Linear(2D -> D)(rmsnorm(cat([x, skip])))
- `attention(qkv, num_heads, backend)`: flash-attn / SDPA / math on the packed qkv projection

On CPU the Triton kernels run only under TRITON_INTERPRET=1 (set it before triton is first imported).
`python -m phenoflow.kernels.aot_check` (TRITON_INTERPRET unset) compiles them for sm_90 without a GPU.
"""
from phenoflow.kernels.attention import attention
from phenoflow.kernels.gated_residual import gated_residual
from phenoflow.kernels.modulated_rmsnorm import modulated_rmsnorm
from phenoflow.kernels.skip_merge import skip_merge

__all__ = ["attention", "gated_residual", "modulated_rmsnorm", "skip_merge"]
