"""Fused long-skip merge Linear(2D -> D)(rmsnorm(cat([x, skip]))) vs its fp32 reference.

Forward and dx, dskip, dweight, dbias on odd/prime shapes, fp32 and bf16 (2x-PyTorch rule), the first
merge's x-with-itself case, and what backward keeps. CPU runs Triton under TRITON_INTERPRET=1.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from phenoflow.kernels.skip_merge import skip_merge, skip_merge_reference
from phenoflow.kernels.testing import check_op

sm_mod = importlib.import_module("phenoflow.kernels.skip_merge")  # the module (the package exports the function)

EPS = 1e-6


def torch_composite(x, skip, weight, bias):
    """PyTorch's own composite in the input dtype (as phenoflow.model.layers' torch path computes it)."""
    h = torch.cat([x, skip], -1)
    h32 = h.float()
    h = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return F.linear(h, weight, bias)


def make_inputs(B, N, D, dtype, device="cpu", seed=0, bias=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, D, generator=g) * 2
    s = torch.randn(B, N, D, generator=g) * 0.5 + 0.1
    w = torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5
    b = torch.randn(D, generator=g) if bias else None
    return [None if t is None else t.to(device, dtype) for t in (x, s, w, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(3, 37, 72), (1, 7, 1152)])
def test_matches_reference(B, N, D, dtype):
    check_op(skip_merge, torch_composite, skip_merge_reference, make_inputs(B, N, D, dtype),
               ["x", "skip", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alternative_triton_gemm_forward(dtype, monkeypatch):
    """The one-kernel Triton GEMM forward (FORWARD_GEMM = "triton") obeys the same rules."""
    monkeypatch.setattr(sm_mod, "FORWARD_GEMM", "triton")
    check_op(skip_merge, torch_composite, skip_merge_reference, make_inputs(2, 37, 72, dtype),
               ["x", "skip", "weight", "bias"])


def test_no_bias_and_x_merged_with_itself():
    """The first merge pairs block 13's output with itself: gradients of both uses add up."""
    x, _, w, _ = make_inputs(2, 11, 72, torch.float32, bias=False)
    check_op(lambda x, w: skip_merge(x, x, w, None), lambda x, w: torch_composite(x, x, w, None),
               lambda x, w: skip_merge_reference(x, x, w, None), [x, w], ["x", "weight"])


def test_saves_no_concatenation_or_normalised_tensor():
    B, N, D = 2, 7, 72
    x, s, w, b = [t.requires_grad_() for t in make_inputs(B, N, D, torch.float32)]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        skip_merge(x, s, w, b)
    # x, skip, weight and the per-token rstd; nothing of size B * N * 2D (the concatenation).
    assert sorted(sizes) == sorted([B * N * D, B * N * D, D * 2 * D, B * N]), sizes


def test_bad_shapes_raise():
    x, s, w, b = make_inputs(1, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        skip_merge(x, s, w[:, :8], b)
    with pytest.raises(ValueError, match="same shape"):
        skip_merge(x, s[:, :2], w, b)
    with pytest.raises(TypeError, match="share a dtype"):
        skip_merge(x, s.double(), w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(16, 2304, 1152), (3, 37, 72)])
def test_matches_reference_cuda(B, N, D, dtype, gemm, monkeypatch):
    monkeypatch.setattr(sm_mod, "FORWARD_GEMM", gemm)
    check_op(skip_merge, torch_composite, skip_merge_reference, make_inputs(B, N, D, dtype, device="cuda"),
               ["x", "skip", "weight", "bias"], fp32_rtol=1e-4)
