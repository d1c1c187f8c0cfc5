"""Benchmark: fused modulated RMSNorm vs eager PyTorch vs torch.compile of the same composite.

y = rmsnorm(x) * (1 + scale) + shift at MiT-XL/2 shapes (B=16, N=2304, D=1152), forward / backward / both.
Minimal bytes: forward reads x and writes y; backward reads dy and x, writes dx; (B, D) and per-token
terms added. Run:  python benchmarks/bench_modrmsnorm.py        (rows -> benchmarks/results/modrmsnorm.csv)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "modrmsnorm"


def main(argv: list[str] | None = None) -> list[dict]:
    common.setup_env()
    import torch

    from phenoflow.kernels.modulated_rmsnorm import modulated_rmsnorm
    from phenoflow.model import layers

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[16, 2304, 1152], metavar=("B", "N", "D"))
    args = common.finish_args(p.parse_args(argv))
    B, N, D = (2, 37, 72) if args.smoke else args.shape
    dt, dev = args.torch_dtype, args.device

    def make_inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(B, N, D, generator=g).to(dev, dt).requires_grad_()
        ada = torch.randn(B, 6 * D, generator=g).to(dev, dt)  # shift/scale as chunks of the adaLN output
        return [x, ada[:, :D].clone().requires_grad_(), ada[:, D:2 * D].clone().requires_grad_()]

    def eager(x, shift, scale):
        return layers.modulated_rmsnorm(x, shift, scale, kernels="torch")

    impls = {"eager": eager, "compile": common.compile_fn(eager, args), "triton": modulated_rmsnorm,
             **common.tile_variants(modulated_rmsnorm, args)}
    e, tok, vec = torch.finfo(dt).bits // 8, B * N, B * D
    fwd = 2 * tok * D * e + 2 * vec * e + tok * 4
    bwd = 3 * tok * D * e + tok * 4 + 2 * vec * e + vec * e
    rows = common.bench_modes(NAME, args, impls, make_inputs, {"forward": fwd, "backward": bwd, "both": fwd + bwd},
                              extra={"B": B, "N": N, "D": D})
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
