"""torch.compile traces through the fused ops (torch.library custom ops) with no graph break.

On CPU the compiled graph calls the real Triton kernels under TRITON_INTERPRET=1 (backend aot_eager: AOTAutograd
traces forward and backward through the ops' fake implementations, then runs them eagerly).
"""
import pytest
import torch
from torch import nn

from phenoflow.kernels import attention, gated_residual, modulated_rmsnorm, skip_merge


class TinyBlock(nn.Module):
    """A MiT-like block touching every op: skip merge, modulated rmsnorm, attention, gated residual + dropout."""

    def __init__(self, D=24, H=3, p=0.1):
        super().__init__()
        self.H, self.p = H, p
        self.skip = nn.Linear(2 * D, D)
        self.ada = nn.Linear(D, 6 * D)
        self.qkv, self.proj, self.fc = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, skip, c):
        x = skip_merge(x, skip, self.skip.weight, self.skip.bias, 1e-6)
        s1, c1, g1, s2, c2, g2 = self.ada(c).chunk(6, dim=-1)
        a = self.proj(attention(self.qkv(modulated_rmsnorm(x, s1, c1)), self.H, "auto"))
        x = gated_residual(x, a, g1, self.p)
        x = gated_residual(x, self.fc(modulated_rmsnorm(x, s2, c2)), g2, 0.0)
        return x


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_compile_fullgraph_matches_eager(p):
    torch.manual_seed(0)
    blk = TinyBlock(p=p)
    x, skip, c = torch.randn(2, 7, 24), torch.randn(2, 7, 24), torch.randn(2, 24)

    def run(fn):
        for prm in blk.parameters():
            prm.grad = None
        torch.manual_seed(1)  # the dropout seed is drawn from torch's generator
        out = fn(x, skip, c)
        out.square().mean().backward()
        return out.detach(), [prm.grad.clone() for prm in blk.parameters()]

    eager_out, eager_grads = run(blk)
    compiled = torch.compile(blk, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    out, grads = run(compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_compile_inductor_cuda():
    torch.manual_seed(0)
    blk = TinyBlock(D=1152, H=16, p=0.1).cuda().bfloat16()
    x, skip = torch.randn(2, 2304, 1152, device="cuda", dtype=torch.bfloat16), torch.randn(
        2, 2304, 1152, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(2, 1152, device="cuda", dtype=torch.bfloat16)
    out = torch.compile(blk, fullgraph=True)(x, skip, c)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
