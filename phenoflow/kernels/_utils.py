"""Small helpers shared by the kernel files: interpreter detection, block sizes, input checks.

On a GPU the launchers pick tiles that keep a few thousand fp32 values in registers per program; under
`TRITON_INTERPRET=1` (CPU, tests) every program is a Python/numpy call, so the launchers prefer few, large
programs there instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor, op: str) -> None:
    """Triton launches need CUDA tensors, or CPU tensors with the interpreter on."""
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda and not interpreting():
            raise RuntimeError(
                f"{op}: tensor on {t.device} needs a CUDA device for the Triton kernel "
                "(set TRITON_INTERPRET=1 before importing triton to run on CPU, or use kernels='torch')")


def check_float(name: str, t: torch.Tensor, op: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")


def row_major(t: torch.Tensor) -> torch.Tensor:
    """A view with unit stride on the last axis when the tensor has one, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# GPU tile knobs (see row_tile). Plain constants, deliberately not read from the environment: the values
# that `benchmarks/bench_*.py --sweep-tiles` finds best on a GPU are written here, in a commit.
TILE_ELEMS = 4096
ELEMS_PER_THREAD = 4


def row_tile(n_rows: int, d: int, live: int = 1) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_D columns, num_warps) for a row-wise op over rows of width d.

    GPU: the whole row in one tile (BLOCK_D = next power of two of d) and about TILE_ELEMS (4096) / `live`
    values per program, `live` being how many full tiles the kernel keeps in registers at once, with
    ELEMS_PER_THREAD (4) values per thread (4 to 16 warps). Chosen from the sm_90 register counts of `python -m phenoflow.kernels.aot_check`:
    at D = 1152 every kernel then needs <= 64 registers per thread (>= 32 resident warps per SM), where
    4-row tiles on 8 warps took 130-235 registers (8-16 warps per SM), too few loads in flight for a
    memory-bound kernel. Not yet timed on a GPU (see benchmarks/README.md).
    Interpreter: up to 64 rows per program, since each program costs a Python call.
    """
    block_d = triton.next_power_of_2(d)
    if interpreting():
        return min(64, triton.next_power_of_2(max(n_rows, 1))), block_d, 4
    block_m = max(1, (TILE_ELEMS // live) // block_d)
    num_warps = min(16, max(4, block_m * block_d // (32 * ELEMS_PER_THREAD)))
    return block_m, block_d, num_warps


def reduction_programs(n_rows: int, block_m: int, batch: int, device: torch.device) -> int:
    """How many programs per sample share a (B, N, D) -> (B, D) reduction (the first of two stages).

    Each program loops over row tiles and keeps its partial column sums in registers; the second stage
    sums the (B, G, D) fp32 partials with torch. G ~ 4 programs per SM in total keeps the partials small.
    """
    tiles = triton.cdiv(n_rows, block_m)
    if interpreting():
        return min(tiles, 2)
    return max(1, min(tiles, triton.cdiv(4 * num_sms(device), batch)))


# ----------------------------------------------------------------------------------------------------------
# Stores. Triton's interpreter casts fp32 -> bf16 by truncation (every rounding mode), twice the error of
# the round-to-nearest-even a GPU does; under the interpreter we round the fp32 value to bf16 precision
# first (bit arithmetic), so CPU tests see the same numbers as the GPU. Compiled kernels skip this branch.

INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def _round_bf16(v):
    # Round-to-nearest-even at bit 16 of the fp32 pattern; the result is exactly representable in bf16.
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def to_out(v, dtype: tl.constexpr):
    """Cast an fp32 block to the output pointer's element type, rounding to nearest."""
    if INTERPRETING:  # noqa: SIM102 - nested so compiled kernels never evaluate the dtype test
        if dtype == tl.bfloat16:
            v = _round_bf16(v)
    return v.to(dtype)
