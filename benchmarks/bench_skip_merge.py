"""Benchmark: fused long-skip merge vs eager PyTorch vs torch.compile of Linear(rmsnorm(cat([x, skip]))).

MiT-XL/2 shapes (B=16, N=2304, D=1152), forward / backward / both. The op is GEMM-bound: rows report
TFLOP/s (2 GEMM FLOP per MAC: forward 2 * M * 2D * D, backward twice that) beside GB/s of the minimal bytes
(forward reads x, skip, W and writes out; backward reads dout, x, skip, W and writes dx, dskip, dW).
Run:  python benchmarks/bench_skip_merge.py        (rows -> benchmarks/results/skip_merge.csv)
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "skip_merge"


def main(argv: list[str] | None = None) -> list[dict]:
    common.setup_env()
    import torch

    from phenoflow.kernels.skip_merge import skip_merge
    from phenoflow.model import layers

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[16, 2304, 1152], metavar=("B", "N", "D"))
    args = common.finish_args(p.parse_args(argv))
    B, N, D = (2, 37, 72) if args.smoke else args.shape
    dt, dev = args.torch_dtype, args.device

    def make_inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        return [torch.randn(B, N, D, generator=g).to(dev, dt).requires_grad_(),
                torch.randn(B, N, D, generator=g).to(dev, dt).requires_grad_(),
                (torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5).to(dev, dt).requires_grad_(),
                torch.zeros(D).to(dev, dt).requires_grad_()]

    def eager(x, s, w, b):
        return layers.skip_merge(x, s, w, b, kernels="torch")

    sm_mod = importlib.import_module("phenoflow.kernels.skip_merge")

    def triton_gemm(*a):  # the one-kernel Triton GEMM forward (backward unchanged)
        saved, sm_mod.FORWARD_GEMM = sm_mod.FORWARD_GEMM, "triton"
        try:
            return skip_merge(*a)
        finally:
            sm_mod.FORWARD_GEMM = saved

    impls = {"eager": eager, "compile": common.compile_fn(eager, args), "triton": skip_merge,
             "triton-gemm": triton_gemm, **common.tile_variants(skip_merge, args)}
    e, M = torch.finfo(dt).bits // 8, B * N
    fwd = 3 * M * D * e + 2 * D * D * e
    bwd = 5 * M * D * e + 4 * D * D * e
    flops = 2 * M * 2 * D * D
    rows = common.bench_modes(NAME, args, impls, make_inputs, {"forward": fwd, "backward": bwd, "both": fwd + bwd},
                              {"forward": flops, "backward": 2 * flops, "both": 3 * flops},
                              extra={"B": B, "N": N, "D": D})
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
