"""Shared benchmark runner: argument parsing, timing, copy bandwidth, result rows.

- Timing: `warmup` untimed calls, then `iters` calls each bracketed by CUDA events (device time, no host
  sync inside the loop); the median is reported. On CPU (smoke mode) wall-clock perf_counter is used.
- Bandwidth: achieved GB/s = the op's minimal bytes (every input read once, every output written once)
  / time, reported against the device's copy bandwidth measured in the same run (`x.copy_(y)` of a
  large buffer, bytes read plus written), so "fraction of copy bandwidth" is a same-run ratio.
- Rows: appended to benchmarks/results/<name>.csv with device, commit (`git rev-parse --short HEAD`), date.
  The file is rewritten atomically (temporary file, then rename) with the union of the columns.
- `--smoke`: tiny shapes on CPU (Triton under TRITON_INTERPRET=1), a couple of iterations: keeps the scripts
  working in the test suite (tests/test_benchmarks_smoke.py); smoke rows are only written where --out says.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def setup_env() -> None:
    """Call before triton is imported: on a machine without CUDA, run Triton through its interpreter."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def parser(description: str, warmup: int = 10, iters: int = 50) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes, 1-2 iterations (for the test suite)")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results; in --smoke mode rows are only printed "
                        "unless --out is given)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--sweep-tiles", action="store_true",
                   help="also time the Triton op at other tile sizes (TILE_ELEMS x ELEMS_PER_THREAD of phenoflow/kernels/_utils.py)")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    import torch

    if args.smoke:
        args.warmup, args.iters = 1, 2
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.out is None and not args.smoke:
        args.out = str(RESULTS)
    return args


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds per call of fn (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 1 << 30, warmup: int = 5, iters: int = 20) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus written (2 x buffer size)."""
    import torch

    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * n * 4 / (ms * 1e-3)


def device_name(device) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The tree's commit: `git rev-parse --short HEAD`, or what gpu_check.py passes down (PHENOFLOW_COMMIT) when
    the tree was copied to a machine without its .git."""
    if os.environ.get("PHENOFLOW_COMMIT"):
        return os.environ["PHENOFLOW_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(device) -> dict[str, str]:
    """The columns every row carries: device, commit, date (UTC, ISO 8601), torch and Triton versions."""
    return {"device": device_name(device), "commit": commit(),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **versions()}


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """torch and Triton versions (rows from the pinned CPU build and the GPU machines' stack differ)."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = ""
    return {"torch": torch.__version__, "triton": tv}


def append_rows(name: str, rows: list[dict], out_dir: str | Path | None) -> Path | None:
    """Print rows; append them to out_dir/<name>.csv (atomic rewrite, columns = union) when out_dir is set."""
    for r in rows:
        print("  ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
    sys.stdout.flush()
    if out_dir is None or not rows:
        return None
    path = Path(out_dir) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    fields: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old = list(reader)
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in old + rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})
    tmp.replace(path)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def bench_modes(name: str, args, impls: dict[str, Callable], make_inputs: Callable[[], list],
                bytes_per_mode: dict[str, int], flops_per_mode: dict[str, float] | None = None,
                extra: dict | None = None) -> list[dict]:
    """Time forward, backward and forward+backward of each implementation (fn(*inputs) -> tensor).

    Each row: impl, mode, ms, achieved GB/s (bytes_per_mode[mode] / time), fraction of the measured copy
    bandwidth, speed-ups against `eager` and `compile` measured in the same run, TFLOP/s when flops are given.
    """
    dev = args.device
    base = {"bench": name, **(extra or {}), "dtype": args.dtype, "smoke": args.smoke}
    bw = copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (1 << 24), args.warmup, max(args.iters, 5))
    rows, ms_of = [], {}
    for impl, fn in impls.items():
        for mode, ms in _time_modes(fn, make_inputs(), dev, args.warmup, args.iters).items():
            gbps = bytes_per_mode[mode] / (ms * 1e-3) / 1e9
            row = {**base, "impl": impl, "mode": mode, "ms": ms, "gbps": gbps,
                   "copy_gbps": bw / 1e9, "frac_copy_bw": gbps / (bw / 1e9)}
            if flops_per_mode:
                row["tflops"] = flops_per_mode[mode] / (ms * 1e-3) / 1e12
            ms_of[impl, mode] = ms
            rows.append(row)
    nan = float("nan")
    for row in rows:
        for ref in ("eager", "compile"):
            row[f"speedup_vs_{ref}"] = ms_of.get((ref, row["mode"]), nan) / row["ms"]
        row.update(stamp(dev))
    return rows


def _time_modes(fn: Callable, inputs: list, dev, warmup: int, iters: int) -> dict[str, float]:
    """ms of forward (no grad), backward (autograd.grad through a kept graph) and forward + backward."""
    import torch

    grads_of = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    out = fn(*inputs)
    gout = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def bwd():
        return torch.autograd.grad(out, grads_of, gout, retain_graph=True)

    def both():
        return torch.autograd.grad(fn(*inputs), grads_of, gout)

    return {mode: time_ms(call, dev, warmup, iters) for mode, call in
            (("forward", fwd), ("backward", bwd), ("both", both))}


TILE_SWEEP = [(e, t) for e in (1024, 2048, 4096, 8192) for t in (2, 4, 8)]


def tile_variants(fn: Callable, args) -> dict[str, Callable]:
    """With --sweep-tiles: fn run at each (TILE_ELEMS, ELEMS_PER_THREAD) of TILE_SWEEP, keyed 'triton[e=..,t=..]'.

    The best pair is then written into phenoflow/kernels/_utils.py (TILE_ELEMS, ELEMS_PER_THREAD).
    """
    if not getattr(args, "sweep_tiles", False):
        return {}
    from phenoflow.kernels import _utils

    def at(elems: int, per_thread: int) -> Callable:
        def run(*a):
            saved = _utils.TILE_ELEMS, _utils.ELEMS_PER_THREAD
            _utils.TILE_ELEMS, _utils.ELEMS_PER_THREAD = elems, per_thread
            try:
                return fn(*a)
            finally:
                _utils.TILE_ELEMS, _utils.ELEMS_PER_THREAD = saved
        return run

    sweep = TILE_SWEEP[:2] if args.smoke else TILE_SWEEP
    return {f"triton[e={e},t={t}]": at(e, t) for e, t in sweep}


def compile_fn(fn: Callable, args) -> Callable:
    """torch.compile of the eager composite: inductor on GPU; aot_eager in smoke mode (no C++ build on CPU)."""
    import torch

    return torch.compile(fn, backend="aot_eager" if args.smoke else "inductor", fullgraph=True)
