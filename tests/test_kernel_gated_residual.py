"""Fused gated residual with Philox projection dropout vs its fp32 reference, and the dropout's statistics.

CPU runs the Triton kernels under TRITON_INTERPRET=1 (set by conftest); bf16 uses the 2x-PyTorch rule.
"""
import math

import pytest
import torch

from phenoflow.kernels.gated_residual import (
    draw_seed,
    dropout_keep_mask,
    gated_residual,
    gated_residual_reference,
)
from phenoflow.kernels.testing import check_op


def make_inputs(B, N, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, N, D, generator=g).to(device, dtype), torch.randn(B, N, D, generator=g).to(device, dtype),
            torch.randn(B, D, generator=g).to(device, dtype)]


def torch_composite(keep=None, p=0.0):
    def fn(x, y, gate):
        if keep is not None:
            y = y * keep.to(y.dtype) / (1 - p)
        return x + gate[:, None] * y
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D", [(3, 37, 72), (2, 5, 1152), (2, 7, 37)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_matches_reference(B, N, D, dtype, p):
    inputs = make_inputs(B, N, D, dtype)
    seed = torch.tensor([1234], dtype=torch.int64)
    keep = dropout_keep_mask(seed, (B, N, D), p) if p > 0 else None
    if p == 0:
        assert dropout_keep_mask(seed, (B, N, D), 0.0).all()
    check_op(lambda x, y, gate: gated_residual(x, y, gate, p, seed=seed), torch_composite(keep, p),
               lambda x, y, gate: gated_residual_reference(x, y, gate, p, keep), inputs, ["x", "y", "gate"])


@pytest.mark.parametrize("B,N,D", [(3, 37, 72), (1, 3, 1152)])
def test_vectorised_philox_matches_per_element_definition(B, N, D):
    """One Philox call per 4 columns (D % 4 == 0) draws exactly the mask of the per-element definition
    u(i) = word (i mod 4) of Philox(seed, i div 4)."""
    seed = torch.tensor([4242])
    fast = dropout_keep_mask(seed, (B, N, D), 0.5)
    slow = dropout_keep_mask(seed, (B, N, D), 0.5, force_scalar_rng=True)
    assert torch.equal(fast, slow)


def test_drop_rate_within_bounds():
    B, N, D, p = 3, 37, 1152, 0.1
    n = B * N * D
    for s in (0, 1, 2):
        rate = 1 - dropout_keep_mask(torch.tensor([s]), (B, N, D), p).float().mean().item()
        # Binomial(n, p): 6 standard deviations.
        assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / n), f"seed {s}: drop rate {rate:.4f} vs p={p}"
    # Per-column and per-token rates are not degenerate either (no stripes from the offset layout).
    keep = dropout_keep_mask(torch.tensor([7]), (B, N, D), 0.5).float()
    assert keep.mean((0, 1)).min() > 0.15 and keep.mean((0, 1)).max() < 0.85
    assert keep.mean((0, 2)).min() > 0.4 and keep.mean((0, 2)).max() < 0.6


def test_seeds_masks_and_backward_consistency():
    B, N, D, p = 2, 37, 72, 0.25
    x, y, gate = make_inputs(B, N, D, torch.float32)
    x, y, gate = torch.zeros_like(x), y.requires_grad_(), torch.ones_like(gate).requires_grad_()
    # Same seed, same mask; different seeds, different masks.
    torch.manual_seed(5)
    out1 = gated_residual(x, y, gate, p)
    torch.manual_seed(5)
    out2 = gated_residual(x, y, gate, p)
    out3 = gated_residual(x, y, gate, p)  # generator moved on: a new seed
    assert torch.equal(out1, out2)
    assert not torch.equal((out1 == 0), (out3 == 0))
    seed = torch.tensor([99])
    assert torch.equal(dropout_keep_mask(seed, (B, N, D), p), dropout_keep_mask(seed, (B, N, D), p))
    assert not torch.equal(dropout_keep_mask(seed, (B, N, D), p), dropout_keep_mask(seed + 1, (B, N, D), p))
    # Backward regenerates the forward's mask: dy is zero exactly where the forward dropped y.
    out = gated_residual(x, y, gate, p, seed=seed)
    out.backward(torch.ones_like(out))
    kept = out != 0
    assert torch.equal(y.grad != 0, kept)
    torch.testing.assert_close(y.grad[kept], torch.full_like(y.grad[kept], 1 / (1 - p)))
    torch.testing.assert_close(gate.grad, (y.detach() * kept / (1 - p)).sum(1))


def test_p0_draws_no_random_numbers_and_bad_input():
    x, y, gate = make_inputs(2, 5, 72, torch.float32)
    state = torch.get_rng_state()
    out = gated_residual(x, y, gate, 0.0)
    assert torch.equal(torch.get_rng_state(), state), "p = 0 must not consume random numbers"
    torch.testing.assert_close(out, x + gate[:, None] * y)
    with pytest.raises(ValueError, match="p=1.0"):
        gated_residual(x, y, gate, 1.0)
    with pytest.raises(ValueError, match="gate must be"):
        gated_residual(x, y, gate[:, :7], 0.1)


def test_draw_seed_follows_torch_generator():
    torch.manual_seed(3)
    a = draw_seed("cpu")
    torch.manual_seed(3)
    assert torch.equal(a, draw_seed("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_matches_reference_cuda(dtype, p):
    B, N, D = 16, 2304, 1152
    inputs = make_inputs(B, N, D, dtype, device="cuda")
    seed = draw_seed("cuda")
    keep = dropout_keep_mask(seed, (B, N, D), p) if p > 0 else None
    if keep is not None:
        rate = 1 - keep.float().mean().item()
        assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / keep.numel())
    check_op(lambda x, y, gate: gated_residual(x, y, gate, p, seed=seed), torch_composite(keep, p),
               lambda x, y, gate: gated_residual_reference(x, y, gate, p, keep), inputs, ["x", "y", "gate"], fp32_rtol=1e-4)
