"""Benchmark: fused gated residual + projection dropout vs eager PyTorch vs torch.compile of the composite.

out = x + gate * dropout(y, p) at MiT-XL/2 shapes (B=16, N=2304, D=1152), p = 0.1 (and --p 0), forward /
backward / both. Minimal bytes: forward reads x, y, writes out; backward reads dout, y, writes dy (dx is
dout itself; the mask is regenerated, never read). Run:  python benchmarks/bench_gated_residual.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "gated_residual"


def main(argv: list[str] | None = None) -> list[dict]:
    common.setup_env()
    import torch

    from phenoflow.kernels.gated_residual import gated_residual
    from phenoflow.model import layers

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[16, 2304, 1152], metavar=("B", "N", "D"))
    p.add_argument("--p", type=float, nargs="+", default=[0.1, 0.0], help="dropout rates to measure")
    args = common.finish_args(p.parse_args(argv))
    B, N, D = (2, 37, 72) if args.smoke else args.shape
    dt, dev = args.torch_dtype, args.device

    def make_inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        return [torch.randn(B, N, D, generator=g).to(dev, dt).requires_grad_(),
                torch.randn(B, N, D, generator=g).to(dev, dt).requires_grad_(),
                torch.randn(B, D, generator=g).to(dev, dt).requires_grad_()]

    e, vec = torch.finfo(dt).bits // 8, B * D
    fwd = 3 * B * N * D * e + vec * e
    bwd = 3 * B * N * D * e + 2 * vec * e
    rows = []
    for rate in args.p:
        def eager(x, y, gate, rate=rate):
            return layers.gated_residual(x, y, gate, rate, kernels="torch")

        def fused(x, y, gate, rate=rate):
            return gated_residual(x, y, gate, rate)

        impls = {"eager": eager, "compile": common.compile_fn(eager, args), "triton": fused,
                 **common.tile_variants(fused, args)}
        rows += common.bench_modes(NAME, args, impls, make_inputs,
                                   {"forward": fwd, "backward": bwd, "both": fwd + bwd},
                                   extra={"B": B, "N": N, "D": D, "p": rate})
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
