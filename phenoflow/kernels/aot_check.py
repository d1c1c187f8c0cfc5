"""Compile every Triton kernel of this package for a GPU target without a GPU, and report its resources.

    TRITON_INTERPRET=0 python -m phenoflow.kernels.aot_check [--arch 90] [--D 1152]

Triton lowers each kernel (at the tile sizes the launchers pick for that D on a GPU) through TTIR, TTGIR,
LLVM IR and PTX to a cubin with the ptxas bundled in the triton wheel; `cuobjdump` (also bundled) reads the
registers, stack and local memory per thread. On a CPU-only machine this catches what the interpreter
cannot: code that does not compile for a real GPU, and register spills (local memory > 0) at real tile sizes.
Exit status 1 when a kernel fails to compile or spills.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _sig(spec: str, t: str) -> dict[str, str]:
    """'X:t RSTD:f N:i32' -> Triton signature; t = the data dtype pointer, f = an fp32 pointer."""
    types = {"t": t, "f": "*fp32"}
    return {name: types.get(ty, ty) for name, ty in (item.split(":") for item in spec.split())}


def kernels(D: int, dtype: str = "bf16") -> list[tuple[str, object, dict, dict, int]]:
    """(name, jit function, signature, constexprs, num_warps) for each kernel at width D."""
    # The launchers' GPU tiles (this process does not interpret).
    from phenoflow.kernels._utils import row_tile

    mr = importlib.import_module("phenoflow.kernels.modulated_rmsnorm")
    gr = importlib.import_module("phenoflow.kernels.gated_residual")
    sm = importlib.import_module("phenoflow.kernels.skip_merge")
    t = f"*{dtype}"

    def entry(name, fn, spec, live=1, **consts):
        bm, bd, warps = row_tile(1 << 20, D, live)
        return name, fn, _sig(spec, t), {**consts, "BLOCK_M": bm, "BLOCK_D": bd}, warps

    out = [
        entry("modulated_rmsnorm.fwd", mr._fwd_kernel,
              "X:t SHIFT:t SCALE:t Y:t RSTD:f N:i32 D:i32 stride_shift:i32 stride_scale:i32 eps:fp32"),
        entry("modulated_rmsnorm.bwd", mr._bwd_kernel,
              "DY:t X:t SCALE:t RSTD:f DX:t DSCALE_PART:f DSHIFT_PART:f N:i32 D:i32 G:i32 stride_scale:i32", live=2),
    ]
    for drop, vec4 in ((False, True), (True, True), (True, False)):
        tag = f"p>0,vec4={vec4}" if drop else "p=0"
        out += [
            entry(f"gated_residual.fwd[{tag}]", gr._fwd_kernel,
                  "X:t Y:t GATE:t SEED:*i64 OUT:t N:i32 D:i32 stride_gate:i32 p:fp32 scale:fp32", live=2,
                  HAS_DROPOUT=drop, VEC4=vec4),
            entry(f"gated_residual.bwd[{tag}]", gr._bwd_kernel,
                  "DOUT:t Y:t GATE:t SEED:*i64 DY:t DGATE_PART:f N:i32 D:i32 G:i32 stride_gate:i32 p:fp32 scale:fp32",
                  live=2, HAS_DROPOUT=drop, VEC4=vec4),
        ]
    out += [
        entry("skip_merge.rstd", sm._rstd_kernel, "X:t S:t RSTD:f M:i32 D:i32 eps:fp32", live=2),
        entry("skip_merge.epilogue", sm._epilogue_kernel, "H:t RSTD:f BIAS:t OUT:t M:i32 D:i32", HAS_BIAS=True),
        entry("skip_merge.bwd_scale", sm._bwd_scale_kernel, "DOUT:t RSTD:f GR:t DB_PART:f M:i32 D:i32 G:i32"),
        entry("skip_merge.bwd_input", sm._bwd_input_kernel, "X:t S:t UV:t RSTD:f DX:t DS:t M:i32 D:i32", live=4),
        ("skip_merge.fused_gemm (alternative)", sm._fused_gemm_kernel,
         _sig("X:t S:t W:t BIAS:t OUT:t RSTD:f M:i32 D:i32", t),
         {"HAS_BIAS": True, "IEEE": dtype == "fp32", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8),
    ]
    return out


def resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL / SHARED per the bundled cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    p.add_argument("--D", type=int, nargs="+", default=[1152, 72])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bad = 0
    for D in args.D:
        for name, fn, sig, consts, warps in kernels(D, args.dtype):
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
            try:
                opts = {"num_warps": warps, **({"num_stages": 3} if "gemm" in name else {})}
                k = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=opts)
                res = resources(k.asm["cubin"])
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                print(f"FAIL  D={D:5d} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                bad += 1
                continue
            spill = res.get("LOCAL", 0) > 0 or res.get("STACK", 0) > 0
            bad += spill
            print(f"{'SPILL' if spill else 'ok':5s} D={D:5d} {name:36s} warps={warps} {consts} "
                  f"regs={res.get('REG')} stack={res.get('STACK')} local={res.get('LOCAL')} smem={k.metadata.shared}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
