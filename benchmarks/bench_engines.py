"""Benchmark: one training step per engine (single, ddp, DeepSpeed ZeRO-1/2/3, fsdp2): images/s, MFU, memory.

Every engine runs the same step (phenoflow.train.bench: synthetic on-device uint8 batches -> linear-path
flow-matching loss -> backward -> engine step with clipping and Adam), with the same micro-batch per GPU, so
the rows compare what each engine adds: gradient communication, sharding hooks, DeepSpeed's optimizer
wrapper. Rows: benchmarks/results/engines.csv with device, commit, date (benchmarks/common.py).

    GPU (MiT-XL/2, 96x96x6, bf16, micro-batch 16 per GPU; one torchrun launch per engine):
        python benchmarks/bench_engines.py [--gpus 1] [--micro 16] [--steps 20]
    CPU (tiny MiT, 2 processes x 1 thread under torchrun, gloo; engine overheads, rows kept):
        python benchmarks/bench_engines.py --cpu
    smoke (the test suite: the CPU comparison with 2 steps, rows only under --out):
        python benchmarks/bench_engines.py --smoke --out DIR
MFU is by the full FLOP count (phenoflow.model.flops) against 989 TFLOP/s per GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common

NAME = "engines"
ENGINES = ("ddp:0", "deepspeed:1", "deepspeed:2", "deepspeed:3", "fsdp2:0")
# Tiny CPU model: depth 4, width 64, 32 px / patch 4 (64 tokens), 6 channels.
TINY = ["model.size=tiny", "model.depth=4", "model.hidden_size=64", "model.num_heads=4", "model.patch_size=4",
        "data.image_size=32", "data.channels=6", "train.precision=fp32", "train.device=cpu"]
XL = ["data.source=synthetic", "train.precision=bf16", "train.device=cuda"]


def overrides(spec: str, world: int, micro: int, base: list[str]) -> list[str]:
    name, stage = spec.split(":")
    return base + [f"train.engine={name}", f"train.zero_stage={stage}", f"train.batch_size={micro * world}",
                   f"train.micro_batch_size={micro}"]


def worker(args) -> None:
    """Runs under torchrun: every engine in turn on the same processes; rank 0 writes rows as JSON lines."""
    import torch.distributed as dist

    from phenoflow.config import resolve
    from phenoflow.train.bench import bench_train

    world = int(os.environ["WORLD_SIZE"])
    rows = []
    for spec in args.engines.split(","):
        cfg = resolve(args.preset, overrides(spec, world, args.micro, TINY if args.tiny else XL))
        row = bench_train(cfg, steps=args.steps, warmup=args.warmup, print_table=False)
        if row is not None:
            rows.append(row)
        if dist.is_initialized():
            dist.barrier()
    if rows:
        with open(args.rows, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, engines: list[str], rows: Path, extra: list[str], timeout: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_BUILD_OPS="0")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if "--tiny" in extra:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker",
           "--engines", ",".join(engines), "--rows", str(rows), *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU tiny-model comparison, 2 steps (test suite)")
    p.add_argument("--cpu", action="store_true", help="CPU tiny-model engine-overhead comparison")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; smoke: print only)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per launch (GPU mode)")
    p.add_argument("--micro", type=int, default=0, help="micro-batch per GPU (default 16 GPU, 8 CPU)")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--preset", default="mit-xl2-rxrx1")
    p.add_argument("--engines", default=",".join(ENGINES))
    # worker-side flags
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.smoke or args.cpu
    args.micro = args.micro or (8 if cpu else 16)
    args.steps = args.steps or (2 if args.smoke else 10 if cpu else 20)
    args.warmup = args.warmup or (1 if args.smoke else 3)
    if args.worker:
        worker(args)
        return []
    import tempfile

    import torch

    from phenoflow.config import resolve
    from phenoflow.train.bench import bench_train, format_rows

    out = args.out if args.out is not None else (None if args.smoke else str(common.RESULTS))
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        common_flags = ["--preset", "demo" if cpu else args.preset, "--micro", str(args.micro), "--steps",
                        str(args.steps), "--warmup", str(args.warmup)]
        if cpu:
            # Baseline: one process, one thread, the same micro-batch (per-rank work) with no communication.
            torch.set_num_threads(1)
            base = bench_train(resolve("demo", overrides("single:0", 1, args.micro, TINY)), steps=args.steps,
                               warmup=args.warmup, print_table=False)
            rows = [base]
            launch(2, engines, rows_file, common_flags + ["--tiny"], timeout=600)
        else:
            base = None
            rows = []
            for spec in ["single:0"] * (args.gpus == 1) + engines:
                if spec == "single:0":  # the single engine needs no launcher
                    cfg = resolve(args.preset, overrides(spec, 1, args.micro, XL))
                    rows.append(bench_train(cfg, steps=args.steps, warmup=args.warmup, print_table=False))
                    base = rows[-1]
                    continue
                launch(args.gpus, [spec], rows_file, common_flags, timeout=1800)
        rows += [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    dev = torch.device("cpu" if cpu else "cuda")
    for r in rows:
        r.update({"bench": NAME, "smoke": args.smoke, "mode": "cpu-tiny" if cpu else "gpu",
                  "step_vs_single": r["step_ms"] / base["step_ms"] if base else float("nan"), **common.stamp(dev)})
    print(format_rows(rows))
    common.append_rows(NAME, rows, out)
    return rows


if __name__ == "__main__":
    main()
