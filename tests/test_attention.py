"""attention(qkv, num_heads, backend): packed-qkv layout, backends against the fp32 math reference, no copies."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from phenoflow.kernels.attention import (
    attention,
    attention_reference,
    flash_attn_usable,
)
from phenoflow.kernels.testing import check_op

attn_mod = importlib.import_module("phenoflow.kernels.attention")  # the module (the package exports the function)


def make_qkv(B, N, H, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(B, N, 3 * H * d, generator=g) * 1.5).to(device, dtype)


def per_head_loop(qkv, H):
    """The layout the qkv Linear writes: last axis [q heads | k heads | v heads], each head d contiguous."""
    D = qkv.shape[-1] // 3
    d = D // H
    q, k, v = qkv.float().split(D, dim=-1)
    outs = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5, dim=-1)
        outs.append(w @ v[..., sl])
    return torch.cat(outs, -1)


def lowp_composite(H):
    """PyTorch's attention written out in the input dtype (the bf16 bound)."""
    def fn(qkv):
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        w = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(B, N, -1)
    return fn


def test_reference_is_per_head_attention():
    qkv = make_qkv(2, 37, 3, 8, torch.float32)
    torch.testing.assert_close(attention_reference(qkv, 3), per_head_loop(qkv, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,H,d", [(2, 37, 3, 24), (1, 11, 2, 72)])
def test_backends_match_reference(backend, dtype, B, N, H, d):
    check_op(lambda qkv: attention(qkv, H, backend), lowp_composite(H), lambda qkv: attention_reference(qkv, H),
               [make_qkv(B, N, H, d, dtype)], ["qkv"], fp32_rtol=1e-5)


def test_sdpa_gets_views_of_qkv(monkeypatch):
    """q, k, v reach SDPA as strided views of the projection output (no copies)."""
    qkv = make_qkv(2, 13, 3, 8, torch.float32)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.extend([q, k, v])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    out = attention(qkv, 3, "sdpa")
    assert out.shape == (2, 13, 24)
    base = qkv.untyped_storage().data_ptr()
    for t in seen:
        assert t.untyped_storage().data_ptr() == base and t.stride(-1) == 1 and t.shape == (2, 3, 13, 8)


def test_backend_errors():
    qkv = make_qkv(1, 5, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        attention(qkv, 2, "fast")
    with pytest.raises(ValueError, match="heads"):
        attention(qkv, 5)
    if not flash_attn_usable(qkv, 8):  # CPU tensors never are
        with pytest.raises(RuntimeError, match="flash-attn"):
            attention(qkv, 2, "flash_attn")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("H,d", [(16, 72), (18, 64)])
def test_backends_match_reference_cuda(backend, H, d):
    check_op(lambda qkv: attention(qkv, H, backend), lowp_composite(H), lambda qkv: attention_reference(qkv, H),
               [make_qkv(2, 2304, H, d, torch.bfloat16, device="cuda")], ["qkv"])
