"""Comparison rules shared by the kernel tests.

fp32: the kernel matches the fp32 reference to a tolerance scaled by the reference's magnitude.
bf16/fp16 (the rule from flash-attention's tests): the kernel's max error against the fp32 reference is at
most `factor` (2) times PyTorch's own low-precision composite's error against the same reference, plus a
small floor relative to the reference's magnitude (so that exact-in-both cases do not fail on one ulp).
"""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item() if a.numel() else 0.0


def assert_matches(name: str, kernel: torch.Tensor, ref: torch.Tensor, torch_lowp: torch.Tensor | None = None,
                   *, factor: float = 2.0, rel_floor: float = 1e-3, fp32_rtol: float = 2e-5) -> None:
    """Check `kernel` against the fp32 `ref`; low precision (kernel.dtype != fp32) uses the 2x-PyTorch rule.

    `torch_lowp`: PyTorch's composite in the kernel's dtype (required for bf16/fp16).
    """
    assert kernel.shape == ref.shape, f"{name}: shape {tuple(kernel.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(kernel.float()).all(), f"{name}: non-finite values"
    scale = max(ref.float().abs().max().item(), 1e-6)
    err = max_err(kernel, ref)
    if kernel.dtype == torch.float32:
        assert err <= fp32_rtol * scale + 1e-6, f"{name} (fp32): max error {err:.3g} vs reference scale {scale:.3g}"
        return
    assert torch_lowp is not None, f"{name}: the {kernel.dtype} rule needs PyTorch's own {kernel.dtype} result"
    torch_err = max_err(torch_lowp, ref)
    bound = factor * torch_err + rel_floor * scale
    assert err <= bound, (f"{name} ({kernel.dtype}): kernel error {err:.3g} > {factor} x PyTorch's {torch_err:.3g}"
                          f" + floor {rel_floor * scale:.3g}")


def forward_backward(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, dtype: torch.dtype | None = None):
    """Run fn on fresh leaf copies of `inputs` (cast to `dtype` if given), backward with grad_out.

    Returns (output, [grad of each input]) (grads of None inputs are None).
    """
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def check_op(kernel_fn, torch_fn, ref_fn, inputs: list[torch.Tensor], names: list[str], seed: int = 0,
               fp32_rtol: float = 2e-5) -> None:
    """Forward and every input gradient of `kernel_fn` against the fp32 `ref_fn` (rule above).

    `inputs` are in the test's dtype; `torch_fn` is PyTorch's composite, run in that dtype for the bound.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = inputs[0].dtype
    out_shape = ref_fn(*[None if t is None else t.float() for t in inputs]).shape
    grad_out = torch.randn(out_shape, generator=g).to(inputs[0].device)
    k_out, k_grads = forward_backward(kernel_fn, inputs, grad_out.to(dtype))
    r_out, r_grads = forward_backward(ref_fn, inputs, grad_out, torch.float32)
    t_out, t_grads = (None, [None] * len(inputs))
    if dtype != torch.float32:
        t_out, t_grads = forward_backward(torch_fn, inputs, grad_out.to(dtype))
    assert_matches("output", k_out, r_out, t_out, fp32_rtol=fp32_rtol)
    for name, kg, rg, tg in zip(names, k_grads, r_grads, t_grads):
        if rg is None:
            continue
        assert kg is not None, f"d{name}: no gradient from the kernel"
        assert kg.dtype == dtype, f"d{name}: dtype {kg.dtype} != input dtype {dtype}"
        assert_matches(f"d{name}", kg, rg, tg, fp32_rtol=fp32_rtol)
