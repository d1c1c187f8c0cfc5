"""Why are the demo's generated crops speckle? (issue 13) Two measurements on the demo preset (or a variant of it).

  overfit  Train the demo model on a handful of images (--overfit-images, default 8, one shard) for --steps steps,
           then generate one image per training image (its own labels, heun and dopri5) and measure each
           generated image's distance to its nearest training image (RMSE on [-1, 1]) against the distance between
           two different training images. A correct model + sampler reproduces the training set (nearest RMSE far
           below the inter-image RMSE): then the speckle is not a defect of the sampler, the time convention, the
           patch (un)folding or the label path.
  trace    Train the demo config (plus --set overrides) in stages of --stage samples; after each stage measure on
           the val split (fixed noise, one draw per image): the flow-matching loss in 10 time buckets (t in
           [0, 0.1), ..., [0.9, 1)) for the raw weights and the EMA (eval.ema_std), the time-averaged loss, and the
           sample quality (FD_morph and the number of nuclei per generated image, heun 20 steps, w = 1, EMA). A
           loss that still falls and an FD that still falls at the demo's budget says: training length.

Rows: benchmarks/results/demo_quality.csv (device, commit, date, torch, the config overrides of the run);
grids: benchmarks/results/demo_quality/<tag>_*.png.
Run:  python benchmarks/demo_quality.py overfit
      python benchmarks/demo_quality.py trace --stage 9600 --stages 8 [--set model.patch_size=2 ...] [--tag NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import common

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = RESULTS / "demo_quality"
BUCKETS = 10


def _cfg(overrides: list[str]):
    from phenoflow.config import resolve

    return resolve("demo", overrides)


def _val_images(cfg, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """All images of a split (uint8 N,C,H,W) with their labels, controls included, in manifest order."""
    from phenoflow.data.loader import ShardLoader
    from phenoflow.data.prepare import prepare_data
    from phenoflow.model.mit import LABEL_GROUPS

    data_dir = prepare_data(cfg)
    loader = ShardLoader(data_dir, split, 64, seed=0, shuffle=False, drop_last=False, infinite=False)
    imgs, labels, keys = [], {g: [] for g in LABEL_GROUPS}, []
    for b in loader:
        imgs.append(b["image"])
        for g in LABEL_GROUPS:
            if g in b:
                labels[g].append(b[g])
        keys += list(b["key"])
    return torch.cat(imgs), {g: torch.cat(v) for g, v in labels.items() if v}, keys


def _nchw(img: torch.Tensor, channels: int) -> torch.Tensor:
    return img if img.shape[1] == channels else img.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def bucket_losses(model, x1: torch.Tensor, labels: dict[str, torch.Tensor], seed: int = 0) -> list[float]:
    """Mean flow-matching loss (linear path, u = x1 - x0) at 10 time buckets; fixed noise and t per image."""
    from phenoflow.flow.paths import build_path

    path = build_path(argparse.Namespace(path="linear"))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(x1.shape, generator=g)
    u = torch.rand(x1.shape[0], generator=g)
    out = []
    model.eval()
    for b in range(BUCKETS):
        t = (b + u) / BUCKETS
        losses = []
        for i in range(0, x1.shape[0], 64):
            sl = slice(i, i + 64)
            xt, target = path.sample(x0[sl], x1[sl], t[sl])
            v = model(xt, t[sl], {k: v[sl] for k, v in labels.items()})
            losses.append((v.float() - target).pow(2).flatten(1).mean(1))
        out.append(float(torch.cat(losses).mean()))
    return out


def _generate(model, labels, keys, shape, solver: str, steps: int, w: float = 1.0):
    from phenoflow.eval.generate import decode, sample_noise
    from phenoflow.flow.guidance import make_velocity_fn
    from phenoflow.flow.solvers import integrate

    outs, nfe = [], []
    for i in range(0, len(keys), 64):
        sl = slice(i, i + 64)
        x0 = sample_noise(keys[sl], shape, 1234)
        x1, n = integrate(make_velocity_fn(model, {k: v[sl] for k, v in labels.items()}, w, ("perturbation",)),
                          x0, 0.0, 1.0, method=solver, steps=steps, rtol=1e-5, atol=1e-5)
        outs.append(decode(x1))
        nfe.append(n)
    return torch.cat(outs), float(np.mean(nfe))


def _rows_out(rows: list[dict]) -> None:
    common.append_rows("demo_quality", rows, RESULTS)


def _meta(tag: str, overrides: list[str]) -> dict:
    load = os.getloadavg()[0]
    return {**common.stamp("cpu"), "tag": tag, "overrides": " ".join(overrides), "threads": torch.get_num_threads(),
            "loadavg_1m": round(load, 2)}


def overfit(args) -> None:
    from phenoflow.eval.evaluate import load_export
    from phenoflow.eval.grids import save_grid
    from phenoflow.train.trainer import train

    n = args.overfit_images
    ov = [f"data.train_images={n}", f"data.val_images={n}", f"data.samples_per_shard={n}",
          f"train.batch_size={n}", f"train.total_samples={n * args.steps}", f"run.out_dir={args.work}",
          f"run.name=overfit-{args.tag}", "data.hflip=false", "data.vflip=false", "model.label_dropout=0.0",
          *args.set]
    cfg = _cfg(ov)
    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0
    imgs, labels, keys = _val_images(cfg, "train")
    x = _nchw(imgs, cfg.data.channels).float() / 127.5 - 1
    inter = torch.cdist(x.flatten(1), x.flatten(1)) / x[0].numel() ** 0.5
    inter_min = float((inter + torch.eye(len(x)) * 1e9).min(1).values.median())
    rows = []
    for std in (0.0, cfg.eval.ema_std):
        model, _, _ = load_export(cfg.run_dir, ema_std=std)
        for solver, steps in (("heun", 20), ("dopri5", 0)):
            gen, nfe = _generate(model, labels, keys, tuple(x.shape[1:]), solver, steps)
            g = gen.float() / 127.5 - 1
            d = torch.cdist(g.flatten(1), x.flatten(1)) / x[0].numel() ** 0.5
            own = float(d.diagonal().median())  # its own (same labels) training image
            nearest = float(d.min(1).values.median())
            rows.append({**_meta(args.tag, ov), "study": "overfit", "images": n, "steps": args.steps,
                         "train_s": round(train_s, 1), "weights": f"ema {std}" if std else "raw", "solver": solver,
                         "nfe": round(nfe), "rmse_nearest_train": round(nearest, 4),
                         "rmse_own_train": round(own, 4), "rmse_between_train_images": round(inter_min, 4)})
            if solver == "heun":
                GRIDS.mkdir(parents=True, exist_ok=True)
                save_grid({"images": (imgs[:8] if imgs.shape[1] == cfg.data.channels else _nchw(imgs[:8], cfg.data.channels),
                                      gen[:8])}, GRIDS / f"overfit_{args.tag}_{'raw' if not std else 'ema'}.png", k=8)
    _rows_out(rows)


def trace(args) -> None:
    from phenoflow.data.prepare import prepare_data
    from phenoflow.eval.evaluate import evaluate, load_export
    from phenoflow.train.trainer import train

    ov = [f"run.out_dir={args.work}", f"run.name=trace-{args.tag}", "train.tensorboard=false",
          "eval.guidance=[1]", *args.set]
    cfg = _cfg(ov)
    prepare_data(cfg)
    imgs, labels, _ = _val_images(cfg, "val")
    x1 = _nchw(imgs, cfg.data.channels).float() / 127.5 - 1
    rows, t_train = [], 0.0
    for s in range(1, args.stages + 1):
        samples = s * args.stage
        c = _cfg([*ov, f"train.total_samples={samples}"])
        t0 = time.perf_counter()
        train(c)
        t_train += time.perf_counter() - t0
        row = {**_meta(args.tag, ov), "study": "trace", "samples": samples, "train_s_cum": round(t_train, 1)}
        for name, std in (("raw", 0.0), ("ema", c.eval.ema_std)):
            model, _, _ = load_export(c.run_dir, ema_std=std)
            bl = bucket_losses(model, x1, labels)
            row[f"loss_{name}"] = round(float(np.mean(bl)), 4)
            row.update({f"loss_{name}_t{b}": round(v, 4) for b, v in enumerate(bl)})
        rep = evaluate(c, c.run_dir, report_dir=Path(args.work) / f"trace-{args.tag}-report-{samples}", progress=False)
        m = json.loads((rep / "metrics.json").read_text())
        row["fd_morph_w1"] = round(float(m["sweep"][0]["metrics"]["FD_morph"]), 3)
        per = m["report_per_w"][0]["morphology_means"]
        row["nuclei_per_image_real"] = round(float(np.mean([v["nuc_count"][0] for v in per.values()])), 2)
        row["nuclei_per_image_gen"] = round(float(np.mean([v["nuc_count"][1] for v in per.values()])), 2)
        GRIDS.mkdir(parents=True, exist_ok=True)
        shutil.copy(rep / "grid_w1.png", GRIDS / f"trace_{args.tag}_{samples}.png")
        rows.append(row)
        _rows_out([row])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("overfit", "trace"))
    p.add_argument("--overfit-images", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--stage", type=int, default=9600, help="samples per trace stage")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides (section.field=value)")
    p.add_argument("--tag", default="demo")
    p.add_argument("--work", default="/tmp/demo_quality")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overfit(args) if args.what == "overfit" else trace(args)


if __name__ == "__main__":
    main()
