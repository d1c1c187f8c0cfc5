"""Benchmark: evaluation throughput — feature extraction, metrics, and sampling cost per solver and guidance.

Rows (benchmarks/results/eval.csv, with device, commit, date):
  kind=features  morphology / inception (FID Inception-v3, 299 px) / dinov2 (ViT-L/14, 224 px) features of
                 N images (C x S x S uint8, projected to RGB for the networks): images/s. The networks run with
                 random weights (throughput does not depend on the values; nothing is downloaded).
  kind=metric    FeatureStats streaming (images/s), Fréchet distance (ms) and KD (100 subsets of 1000, ms) at d.
  kind=sampling  one guided solve of a batch with an untrained MiT: NFE (velocity evaluations), network
                 forwards (2 per evaluation when w is not 0 or 1) and images/s, per solver and guidance w.
                 Untrained weights are near zero-velocity fields, so dopri5's NFE here is a lower bound.
Run:  python benchmarks/bench_eval.py [--smoke]     (GPU: features and sampling on cuda, MiT size --size)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "eval"


def _timed(fn, device) -> float:
    common.sync(device)
    t0 = time.perf_counter()
    fn()
    common.sync(device)
    return time.perf_counter() - t0


def bench_features(args, rows: list[dict]) -> None:
    import torch

    from phenoflow.eval.dinov2 import VIT_L14, DINOv2, ViTShape
    from phenoflow.eval.inception import FIDInceptionV3
    from phenoflow.eval.morphology import morphology_features
    from phenoflow.eval.project import project_to_rgb

    dev, s, c = args.device, args.image_size, 6
    g = torch.Generator().manual_seed(0)
    n_morph = 64 if args.smoke else 1024
    imgs = torch.randint(0, 256, (n_morph, c, s, s), dtype=torch.uint8, generator=g)
    morphology_features(imgs[:8])  # warm-up
    t = _timed(lambda: morphology_features(imgs), "cpu")
    rows.append({"kind": "features", "name": "morphology", "device_used": "cpu", "images": n_morph,
                 "image_size": s, "seconds": t, "images_per_s": n_morph / t})
    dino_shape = ViTShape(embed_dim=64, depth=2, num_heads=4, pos_grid=4, input_size=56) if args.smoke else VIT_L14
    nets = {"inception": FIDInceptionV3(), "dinov2": DINOv2(dino_shape)}
    for name, net in nets.items():
        net = net.to(dev).eval()
        n = 2 if args.smoke else (256 if dev.type == "cuda" else 16)
        bs = min(n, args.feature_batch)
        batch = imgs[:bs].to(dev)
        reps = max(1, n // bs)

        def run(net=net, batch=batch, reps=reps):
            for _ in range(reps):
                net(project_to_rgb(batch))

        with torch.no_grad():
            net(project_to_rgb(batch))  # warm-up
            t = _timed(run, dev)
        done = bs * reps
        rows.append({"kind": "features", "name": name + ("-small" if args.smoke and name == "dinov2" else ""),
                     "device_used": dev.type, "images": done, "batch": bs, "image_size": s, "seconds": t,
                     "images_per_s": done / t})


def bench_metrics(args, rows: list[dict]) -> None:
    import torch

    from phenoflow.eval.metrics import FeatureStats, frechet_distance, kernel_distance

    d, n = (64, 256) if args.smoke else (2048, 5000)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.1 + 0.1
    stats = {}

    def stream():
        for name, f in (("a", a), ("b", b)):
            s = FeatureStats(d)
            for i in range(0, n, 256):
                s.update(f[i:i + 256])
            stats[name] = s

    t = _timed(stream, "cpu")
    rows.append({"kind": "metric", "name": "stats_update", "dim": d, "images": 2 * n, "seconds": t,
                 "images_per_s": 2 * n / t})
    t = _timed(lambda: frechet_distance(stats["a"], stats["b"]), "cpu")
    rows.append({"kind": "metric", "name": "frechet_distance", "dim": d, "seconds": t, "ms": t * 1e3})
    subsets = 10 if args.smoke else 100
    t = _timed(lambda: kernel_distance(a, b, subsets=subsets, subset_size=100), "cpu")
    rows.append({"kind": "metric", "name": f"kernel_distance_{subsets}x{min(1000, n)}", "dim": d, "seconds": t,
                 "ms": t * 1e3})


def bench_sampling(args, rows: list[dict]) -> None:
    import torch

    from phenoflow.config import resolve
    from phenoflow.flow.guidance import make_velocity_fn
    from phenoflow.flow.solvers import integrate
    from phenoflow.model.mit import build_model

    dev = args.device
    overrides = [f"model.size={args.size}", f"data.image_size={args.image_size}", "model.proj_dropout=0.0"]
    if args.size == "tiny":
        overrides.append("model.patch_size=4")
    cfg = resolve("demo", overrides)
    vocab = {"perturbation": 100, "experiment": 4, "cell_type": 1}
    torch.manual_seed(0)
    model = build_model(cfg, vocab).to(dev).eval()
    with torch.no_grad():  # untrained MiT outputs exactly 0 (zero-initialised final layer): give it a field
        for p in model.final_layer.parameters():
            p.normal_(0, 0.02)
    bs = 4 if args.smoke else args.sample_batch
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(bs, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, generator=g).to(dev)
    labels = {"perturbation": torch.arange(bs, device=dev) % 100, "experiment": torch.zeros(bs, dtype=torch.long,
              device=dev), "cell_type": torch.zeros(bs, dtype=torch.long, device=dev)}
    steps = 2 if args.smoke else 20
    model(x0, torch.zeros(bs, device=dev), labels)  # warm-up (allocator, kernels)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and args.bf16 else None
    for solver in ("euler", "heun", "dopri5"):
        for w in args.guidance:
            out: dict = {}

            def solve(out=out, w=w, solver=solver):
                with torch.no_grad(), (autocast or torch.autocast("cpu", enabled=False)):
                    out["x"], out["nfe"] = integrate(make_velocity_fn(model, labels, w), x0, 0.0, 1.0,
                                                     method=solver, rtol=1e-5, atol=1e-5, steps=steps)

            t = _timed(solve, dev)
            fwd = out["nfe"] * (1 if w in (0.0, 1.0) else 2)
            rows.append({"kind": "sampling", "name": f"mit-{args.size}", "solver": solver, "w": w,
                         "steps": steps if solver != "dopri5" else "", "batch": bs, "image_size": args.image_size,
                         "nfe": out["nfe"], "forwards": fwd, "seconds": t, "images_per_s": bs / t,
                         "bf16": bool(autocast)})


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    p = common.parser(__doc__.splitlines()[0], warmup=1, iters=1)
    p.add_argument("--parts", nargs="+", default=["features", "metrics", "sampling"],
                   choices=["features", "metrics", "sampling"])
    p.add_argument("--size", default=None, help="MiT size for sampling (default tiny on CPU, XL on GPU)")
    p.add_argument("--image-size", type=int, default=None, help="image size (default 96; 32 on CPU for sampling)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--feature-batch", type=int, default=64)
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for sampling on GPU (default fp32)")
    args = common.finish_args(p.parse_args(argv))
    gpu = args.device.type == "cuda"
    args.size = args.size or ("XL" if gpu else "tiny")
    rows: list[dict] = []
    for part in args.parts:
        args.image_size = args.image_size or (16 if args.smoke else 96)
        if part == "sampling" and not gpu and not args.smoke and args.size == "tiny":
            args.image_size = 32
        with torch.no_grad():  # scoped: main() may run inside another process (the smoke test)
            {"features": bench_features, "metrics": bench_metrics, "sampling": bench_sampling}[part](args, rows)
        args.image_size = None if part == "sampling" else args.image_size
    stamp = common.stamp(args.device)
    rows = [{"bench": NAME, "smoke": args.smoke, **r, **stamp} for r in rows]
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
