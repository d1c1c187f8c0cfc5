"""Fused modulated RMSNorm vs its fp32 reference: forward, dx, dshift, dscale on odd/prime shapes.

CPU runs the Triton kernels under TRITON_INTERPRET=1 (set by conftest); bf16/fp16 use the 2x-PyTorch rule.
"""
import pytest
import torch

from phenoflow.kernels.modulated_rmsnorm import (
    modulated_rmsnorm,
    modulated_rmsnorm_reference,
)
from phenoflow.kernels.testing import check_op

EPS = 1e-6


def torch_composite(x, shift, scale):
    """PyTorch's own composite in the input dtype (as phenoflow.model.layers' torch path computes it)."""
    x32 = x.float()
    xn = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return xn * (1 + scale[:, None]) + shift[:, None]


def make_inputs(B, N, D, dtype, device="cpu", seed=0, strided=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * 3 + 0.5).to(device, dtype)
    if strided:  # shift/scale as chunks of an adaLN output (B, 6D): row stride 6D, like the model passes them
        ada = torch.randn(B, 6 * D, generator=g).to(device, dtype)
        shift, scale = ada[:, :D], ada[:, 2 * D:3 * D]
        assert not shift.is_contiguous()
    else:
        shift, scale = torch.randn(B, D, generator=g).to(device, dtype), torch.randn(B, D, generator=g).to(device, dtype)
    return [x, shift, scale]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(3, 37, 72), (2, 5, 1152), (1, 1, 72)])
def test_matches_reference(B, N, D, dtype):
    check_op(modulated_rmsnorm, torch_composite, modulated_rmsnorm_reference, make_inputs(B, N, D, dtype),
               ["x", "shift", "scale"])


def test_fp16_and_strided_modulation():
    check_op(modulated_rmsnorm, torch_composite, modulated_rmsnorm_reference,
               make_inputs(2, 37, 72, torch.float16, strided=True), ["x", "shift", "scale"])
    check_op(modulated_rmsnorm, torch_composite, modulated_rmsnorm_reference,
               make_inputs(2, 11, 72, torch.float32, strided=True), ["x", "shift", "scale"])


def saved_tensor_sizes(fn, *inputs):
    """numel of every tensor autograd saves for backward while running fn."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sizes


def test_saves_only_x_and_rstd():
    """Backward keeps x and the per-token rstd (plus the (B, D) scale): no normalised tensor."""
    B, N, D = 2, 7, 72
    inputs = [t.requires_grad_() for t in make_inputs(B, N, D, torch.float32)]
    sizes = saved_tensor_sizes(modulated_rmsnorm, *inputs)
    assert sorted(sizes) == sorted([B * N * D, B * N, B * D]), sizes
    # The eager composite keeps at least two full-size tensors; the fused op one.
    assert sum(s >= B * N * D for s in saved_tensor_sizes(torch_composite, *inputs)) >= 2


def test_bad_shapes_raise():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="shift must be"):
        modulated_rmsnorm(x, torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match="x must be"):
        modulated_rmsnorm(torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(TypeError, match="dtype"):
        modulated_rmsnorm(x.long(), torch.randn(2, 8), torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(16, 2304, 1152), (3, 37, 72), (5, 37, 1152)])
def test_matches_reference_cuda(B, N, D, dtype):
    check_op(modulated_rmsnorm, torch_composite, modulated_rmsnorm_reference,
               make_inputs(B, N, D, dtype, device="cuda", strided=True), ["x", "shift", "scale"], fp32_rtol=1e-4)
