"""Benchmark: the machine's two ceilings and its software, the line every other row is read against.

One row (benchmarks/results/env.csv): GPU name and memory, driver, torch / Triton / CUDA / cuDNN versions,
Python; measured device-copy bandwidth (`dst.copy_(src)` of a 1 GiB fp32 buffer, bytes read plus written:
the memory-bound ceiling) and a measured dense bf16 GEMM rate (`a @ b`, 8192^3, 2 * 8192^3 FLOP per call: the
compute-bound ceiling), beside the datasheet dense bf16 peak the MFU columns use (989 TFLOP/s, H100 and H200).
Run:  python benchmarks/bench_env.py [--smoke]
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "env"


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def gemm_tflops(device, n: int, dtype, warmup: int, iters: int) -> float:
    """Measured dense GEMM rate in TFLOP/s: an n x n by n x n product counts 2 n^3 FLOP."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = common.time_ms(lambda: torch.matmul(a, b, out=out), device, warmup, iters)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> list[dict]:
    common.setup_env()
    import torch

    from phenoflow.model.flops import H100_BF16_PEAK_FLOPS

    p = common.parser(__doc__.splitlines()[0], warmup=5, iters=20)
    p.add_argument("--gemm-n", type=int, default=8192, help="GEMM size n (n x n x n)")
    p.add_argument("--copy-mib", type=int, default=1024, help="copy buffer size in MiB")
    args = common.finish_args(p.parse_args(argv))
    dev = args.device
    gpu = dev.type == "cuda"
    n, mib = (args.gemm_n, args.copy_mib) if not args.smoke else (256, 16)
    dtype = args.torch_dtype if gpu else torch.float32  # bf16 GEMMs on a CPU measure nothing useful
    row = {"bench": NAME, "smoke": args.smoke, "python": platform.python_version(), "cuda": torch.version.cuda or "", "cudnn": str(torch.backends.cudnn.version() or ""),
           "gpu": torch.cuda.get_device_name(dev) if gpu else "cpu",
           "gpu_mem_gb": torch.cuda.get_device_properties(dev).total_memory / 2**30 if gpu else float("nan"),
           "driver": driver_version() if gpu else "", "cpu_cores": os.cpu_count(),
           "copy_mib": mib, "gemm_n": n, "gemm_dtype": str(dtype).removeprefix("torch."),
           "datasheet_bf16_tflops": H100_BF16_PEAK_FLOPS / 1e12}
    row["copy_gbps"] = common.copy_bandwidth(dev, mib << 20, args.warmup, args.iters) / 1e9
    row["gemm_tflops"] = gemm_tflops(dev, n, dtype, args.warmup, args.iters)
    row["gemm_frac_datasheet"] = row["gemm_tflops"] / row["datasheet_bf16_tflops"] if gpu else float("nan")
    rows = [{**row, **common.stamp(dev)}]
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
