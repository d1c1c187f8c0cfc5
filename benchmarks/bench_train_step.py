"""Benchmark: one MiT training step (forward, MSE flow-matching loss, backward, grad clip, Adam) per config.

MiT-XL/2 on 96x96x6 (2,304 tokens) and the XL-h64 size (18 heads of 64), micro-batch 16 by default;
configs: eager (torch ops), compile (torch.compile of the torch-op model), compile+kernels (torch.compile
with the fused Triton ops). Rows: images/s, MFU by the full FLOP count of ARCHITECTURE.md section 6
(phenoflow.model.flops: linear layers, attention QK^T and AV, long skips, embeddings, adaLN; forward +
backward = 3 x forward, counted from the model's shape) against 989 TFLOP/s dense bf16, and peak memory.
Precision: bf16 autocast over fp32 weights (the single-GPU trainer's recipe); --precision bf16 casts the
model to bf16 instead (what DeepSpeed's bf16 mode computes with).
Run:  python benchmarks/bench_train_step.py        (rows -> benchmarks/results/train_step.csv)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "train_step"
CONFIGS = ("eager", "compile", "compile+kernels")


def make_step(fwd, model, opt, x1, labels, autocast: bool):
    """One training step: x_t = t x1 + (1 - t) x0, MSE to the velocity x1 - x0, backward, clip 0.5, Adam."""
    import torch
    import torch.nn.functional as F

    def step():
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
        tt = t[:, None, None, None]
        with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=autocast):
            v = fwd(tt * x1 + (1 - tt) * x0, t, labels)
        F.mse_loss(v.float(), (x1 - x0).float()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    common.setup_env()
    import torch

    from phenoflow.config import resolve
    from phenoflow.model.flops import H100_BF16_PEAK_FLOPS, mfu, train_flops_per_image
    from phenoflow.model.mit import build_model
    from phenoflow.train.engines.single import apply_activation_checkpointing

    p = common.parser(__doc__.splitlines()[0], warmup=3, iters=10)
    p.add_argument("--sizes", nargs="+", default=["XL", "XL-h64"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--batch", type=int, default=16, help="micro-batch per GPU")
    p.add_argument("--precision", default="autocast", choices=["autocast", "bf16", "fp32"])
    p.add_argument("--attn-backend", default="auto", choices=["auto", "flash_attn", "sdpa", "math"])
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (the trainer's train.activation_checkpointing)")
    p.add_argument("--compile-scope", default="block", choices=["block", "model"],
                   help="block: torch.compile each MiT block (one graph, compiled once and reused by all blocks, "
                        "as the distributed engines do; minutes less than a whole-model compile); model: the "
                        "whole model (the single engine's train.compile)")
    args = common.finish_args(p.parse_args(argv))
    dev = args.device
    if args.smoke:  # tiny model, fp32 (bf16 autocast on CPU is only slow, not informative)
        args.sizes, args.batch, args.precision, args.iters = ["tiny"], 2, "fp32", 1
        # Smoke compiles with aot_eager (no C++ build), whose backward of a separately compiled block fails on
        # torch 2.13 ("view size is not compatible", a tangent-stride guess; inductor runs the same block), so
        # smoke compiles the whole model (checked by hand: block scope under inductor runs on CPU, torch 2.13).
        args.compile_scope = "model"
    vocab = {"perturbation": 1139, "experiment": 51, "cell_type": 4}  # RxRx1-like label tables
    rows = []
    for size in args.sizes:
        for config in args.configs:
            kernels = "triton" if config == "compile+kernels" else "torch"
            overrides = [f"model.size={size}", f"model.kernels={kernels}", f"model.attn_backend={args.attn_backend}"]
            if args.smoke:
                overrides += ["data.image_size=16", "model.patch_size=4", "model.depth=2", "model.hidden_size=64",
                              "model.num_heads=2"]
            cfg = resolve("mit-xl2-rxrx1", overrides)
            torch.manual_seed(0)
            model = build_model(cfg, vocab).to(dev).train()
            if args.precision == "bf16":
                model = model.to(torch.bfloat16)
            shape = model.shape
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
            fwd = model
            if args.activation_checkpointing:
                apply_activation_checkpointing(model)
            if config.startswith("compile"):
                backend = "aot_eager" if args.smoke else "inductor"
                if args.compile_scope == "block":
                    for blk in model.blocks:
                        blk.compile(backend=backend)
                else:
                    fwd = torch.compile(model, backend=backend)
            B, C, H = args.batch, cfg.data.channels, cfg.data.image_size
            mdt = torch.bfloat16 if args.precision == "bf16" else torch.float32
            x1 = torch.rand(B, C, H, H, device=dev, dtype=mdt) * 2 - 1
            labels = {k: torch.randint(0, n, (B,), device=dev) for k, n in vocab.items()}

            step = make_step(fwd, model, opt, x1, labels, args.precision == "autocast")
            row = {"bench": NAME, "size": size, "config": config, "batch": B, "image": f"{H}x{H}x{C}",
                   "heads": shape.num_heads, "head_dim": shape.hidden_size // shape.num_heads,
                   "params_m": sum(q.numel() for q in model.parameters()) / 1e6, "precision": args.precision,
                   "activation_checkpointing": args.activation_checkpointing,
                   "compile_scope": args.compile_scope if config.startswith("compile") else "",
                   "smoke": args.smoke, "train_tflop_per_image": train_flops_per_image(shape) / 1e12,
                   "peak_tflops": H100_BF16_PEAK_FLOPS / 1e12}
            try:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                ms = common.time_ms(step, dev, args.warmup, args.iters)
                ips = B / (ms * 1e-3)
                row.update(status="ok", ms=ms, images_per_s=ips, mfu=mfu(ips, shape),
                           peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan"))
            except torch.OutOfMemoryError:
                row.update(status="oom")
            rows.append({**row, **common.stamp(dev)})
            model = opt = fwd = x1 = step = None  # free before the next config
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
