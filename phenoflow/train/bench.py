"""`phenoflow bench train`: time N optimizer steps of a preset with its engine and print a table.

Each step is the trainer's step on synthetic on-device batches (uint8 images -> encode -> linear path, so
data loading is excluded; `benchmarks/bench_loader.py` measures the loader): `accum_steps` micro-batches of
forward (under the engine's autocast), backward, then the engine's step (clip + Adam; for DeepSpeed also its
reductions). The phases are separated by device synchronisation so that each is timed on its own; gradient
communication is measured where the engine runs it: inside `backward` (DDP buckets, ZeRO-2 overlap, FSDP2
reduce-scatter) or `step` (ZeRO-1, ZeRO-2's weight all-gather), so the engine comparison is the phase table.
Images/s count the global batch; MFU is per GPU by the full FLOP count (phenoflow.model.flops) against 989
TFLOP/s. Under torchrun every rank runs; rank 0 prints, peak memory is the maximum over ranks.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from phenoflow.model.flops import mfu, train_flops_per_image
from phenoflow.model.mit import LABEL_GROUPS, build_model
from phenoflow.train.engines import build_engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg, n: int, vocab: dict[str, int], gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    C, H = cfg.data.channels, cfg.data.image_size
    b = {"image": torch.randint(0, 256, (n, C, H, H), generator=gen, dtype=torch.uint8).to(device)}
    for g in LABEL_GROUPS:
        if vocab.get(g):
            b[g] = torch.randint(0, vocab[g], (n,), generator=gen).to(device)
    return b


def vocab_of(cfg) -> dict[str, int]:
    d, m = cfg.data, cfg.model
    return {"perturbation": m.num_perturbations or d.num_perturbations,
            "experiment": m.num_experiments or d.num_experiments, "cell_type": m.num_cell_types or d.num_cell_types}


def run_steps(engine, cfg, model, vocab: dict[str, int], steps: int, warmup: int, profiler=None) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones. Returns per-phase medians in seconds."""
    dev = engine.device
    gen = torch.Generator().manual_seed(engine.rank)
    times = {"forward": [], "backward": [], "step": [], "total": []}
    for i in range(warmup + steps):
        batches = [synthetic_batch(cfg, engine.micro_batch, vocab, gen, dev) for _ in range(engine.accum_steps)]
        _sync(dev)
        t_f = t_b = 0.0
        t_start = time.perf_counter()
        for b in batches:
            x1 = b["image"].float() / 127.5 - 1
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0], device=dev)
            tt = t[:, None, None, None]
            labels = {g: b[g] for g in LABEL_GROUPS if g in b}
            t0 = time.perf_counter()
            with engine.autocast():
                v = engine.forward_model(tt * x1 + (1 - tt) * x0, t, labels)
            loss = (v.float() - (x1 - x0)).pow(2).mean() / engine.accum_steps
            _sync(dev)
            t1 = time.perf_counter()
            engine.backward(loss)
            _sync(dev)
            t_f, t_b = t_f + t1 - t0, t_b + time.perf_counter() - t1
        t2 = time.perf_counter()
        engine.step(cfg.train.grad_clip)
        _sync(dev)
        t3 = time.perf_counter()
        if i >= warmup:
            for k, v in (("forward", t_f), ("backward", t_b), ("step", t3 - t2), ("total", t3 - t_start)):
                times[k].append(v)
        if profiler is not None:
            profiler.step()
    return {k: statistics.median(v) for k, v in times.items()}


def bench_train(cfg, steps: int = 10, warmup: int = 2, profile_dir: str = "", csv: str = "",
                print_table: bool = True) -> dict | None:
    """Build the preset's model and engine, time the steps, print (rank 0) and return a result row."""
    engine = build_engine(cfg)
    vocab = vocab_of(cfg)
    torch.manual_seed(cfg.train.seed)
    model = engine.setup(build_model(cfg, vocab))
    dev = engine.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    prof = None
    if profile_dir:
        from torch.profiler import (
            ProfilerActivity,
            profile,
            schedule,
            tensorboard_trace_handler,
        )

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        prof = profile(activities=acts, schedule=schedule(wait=0, warmup=warmup, active=min(steps, 3), repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(Path(profile_dir)), worker_name=f"rank{engine.rank}"),
                       record_shapes=False)
        prof.start()
    try:
        t = run_steps(engine, cfg, model, vocab, steps, warmup, prof)
    finally:
        if prof is not None:
            prof.stop()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    peak = engine.all_reduce_max(peak)
    total = engine.all_reduce_max(t["total"])  # the slowest rank sets the pace
    ips = cfg.train.batch_size / total
    row = {"engine": engine.name if engine.name != "deepspeed" else f"zero{engine.stage}",
           "world_size": engine.world_size, "model": f"{cfg.model.size}/{cfg.model.patch_size}",
           "image_size": cfg.data.image_size, "global_batch": cfg.train.batch_size, "micro_batch": engine.micro_batch,
           "accum": engine.accum_steps, "precision": "bf16" if engine.amp_dtype else "fp32",
           "compile": cfg.train.compile, "activation_checkpointing": cfg.train.activation_checkpointing,
           "params": engine.num_params(), "images_per_s": ips, "images_per_s_per_gpu": ips / engine.world_size,
           "mfu": mfu(ips / engine.world_size, model.shape), "step_ms": 1e3 * total,
           "forward_ms": 1e3 * t["forward"], "backward_ms": 1e3 * t["backward"], "optim_ms": 1e3 * t["step"],
           "peak_mem_gb": peak, "train_flops_per_image": train_flops_per_image(model.shape), "steps": steps}
    if engine.is_main and print_table:
        print(format_rows([row]))
    if engine.is_main and csv:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
        from benchmarks import (
            common,  # the shared result-row writer (device, commit, date)
        )

        row.update(common.stamp(dev))
        common.append_rows(Path(csv).stem, [row], Path(csv).parent)
    return row if engine.is_main else None


def format_rows(rows: list[dict]) -> str:
    cols = [("engine", "{}"), ("world_size", "{}"), ("micro_batch", "{}"), ("accum", "{}"),
            ("images_per_s", "{:.1f}"), ("mfu", "{:.2%}"), ("step_ms", "{:.1f}"), ("forward_ms", "{:.1f}"),
            ("backward_ms", "{:.1f}"), ("optim_ms", "{:.1f}"), ("peak_mem_gb", "{:.2f}")]
    lines = ["  ".join(f"{c:>12}" for c, _ in cols)]
    for r in rows:
        lines.append("  ".join(f"{f.format(r[c]):>12}" for c, f in cols))
    return "\n".join(lines)
