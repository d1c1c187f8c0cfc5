"""Benchmark: expression (issue 11) training throughput, loader throughput against backed h5ad, peak training memory.

Parts (--parts, default all three):
  train   cells/s of one training step = forward + flow-matching MSE (linear path, u = x1 - x0) + backward + Adam,
          for --genes (2,000 and 8,000) and three models: unet_ref (the PRiMeFlow shape reference: base 32,
          channel_mult (1, 2, 4, 8), 2 ResBlocks per level), unet_cpu (the CPU presets' base 16, (1, 2, 4)) and
          mlp (the ablation: width 512, depth 4). Random log1p-like inputs (the cost does not depend on the
          values), 12 perturbations, 3 cell types, 1 dataset, dose. CPU: fp32, --threads intra-op threads (default 1); GPU: bf16
          autocast. Median of --iters timed steps after --warmup (common.time_ms: CUDA events on GPU).
  loader  cells/s per worker of two epochs of row batches (--batch cells, dense float32 (B, G) plus labels) from
          expression shards (phenoflow ShardLoader: tar members of sparse rows read from each shard's memory map,
          labels mapped through the manifest's vocabularies; epoch 0 also checks every member's crc32 and builds
          the shard tables (checksums=first_pass; also measured with checksums=off, like for like with the h5ad,
          which checks nothing), epoch 1 is every later epoch of a run: the loader keeps its
          workers between passes) against the same cells from the h5ad in
          anndata backed mode (read_h5ad(backed='r'): obs in memory, X through h5py; each batch = the same cells
          in the same shuffled order as the shard epoch, rows sorted for h5py, X[rows] as CSR, densified, put back
          in order, perturbation codes from obs), both in a DataLoader with --workers processes (0 = main
          process). Page cache warm for both (files written just before). Target: shards >= 5x. An epoch is
          --loader-cells cells (65,536: a process's one-off warm-up, ~0.1 s, would dominate a shorter epoch).
  memory  peak resident memory (VmHWM of a fresh process) while training --mem-steps steps of the CPU-preset U-Net
          (expression-demo preset, phenoflow.train.trainer.Trainer, data.source=shards) from a shard folder
          converted from a generated h5ad of --mem-cells cells x 2,000 genes, and the same from a folder of one
          block (4,096 cells): the peak must not grow with the file, and the file must be >= 4x the peak. The big
          h5ad repeats one generate_counts block (4,096 cells, counts layer + log1p X, its obs rows renamed),
          written block by block (anndata.io.write_elem + sparse_dataset.append) so the writer's memory stays
          small too. The converter's own peak (convert_anndata from the path, in a fresh process) is recorded.
Rows: benchmarks/results/expression.csv (with device, commit, date, torch/Triton versions).
Run:  python benchmarks/bench_expression.py [--smoke] [--parts train loader memory]   (CPU: about 6 minutes)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "expression"
VOCAB = {"perturbation": 12, "cell_type": 3, "dataset": 1}
MODELS = {
    "unet_ref": ("unet", {"base_channels": 32, "channel_mult": (1, 2, 4, 8), "num_res_blocks": 2, "norm_groups": 8}),
    "unet_cpu": ("unet", {"base_channels": 16, "channel_mult": (1, 2, 4), "num_res_blocks": 2, "norm_groups": 8}),
    "mlp": ("mlp", {"width": 512, "depth": 4}),
}
BLOCK_CELLS = 4096


def _vm(key: str, pid: int | str = "self") -> float:
    """/proc/<pid>/status field in MB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- part 1: training throughput --------------------------------------------------------------------------

def _train_step(model, opt, path, x1, labels, amp: bool, dtype):
    """One step: x0 ~ N(0, I), t ~ U(0, 1), x_t and u_t on the linear path, MSE(v(x_t, t), u_t), backward, Adam."""
    import torch

    def step():
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        xt, ut = path.sample(x0, x1, t)
        with torch.autocast(x1.device.type, dtype=dtype, enabled=amp):
            v = model(xt, t, labels)
        loss = torch.nn.functional.mse_loss(v.float(), ut)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_train(args) -> list[dict]:
    import torch

    from phenoflow.flow.paths import LinearPath
    from phenoflow.model.expression import build_expression_model

    dev = args.device
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    path = LinearPath()
    for genes in args.genes:
        for name in args.models:
            kind, opts = MODELS[name]
            if args.smoke:
                opts = {**opts, **({"base_channels": 8, "channel_mult": (1, 2)} if kind == "unet" else
                                   {"width": 32, "depth": 2})}
            batch = args.train_batch.get(name, 64)
            torch.manual_seed(0)
            model = build_expression_model(kind, genes, VOCAB, dose=True, **opts).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            g = torch.Generator(device="cpu").manual_seed(0)
            x1 = (torch.rand(batch, genes, generator=g) * 3 * (torch.rand(batch, genes, generator=g) < 0.45)).to(dev)
            labels = {"perturbation": torch.randint(0, 12, (batch, 2), generator=g).to(dev),
                      "cell_type": torch.randint(0, 3, (batch,), generator=g).to(dev),
                      "dataset": torch.zeros(batch, dtype=torch.long, device=dev),
                      "dose": torch.zeros(batch, device=dev)}
            amp = dev.type == "cuda" and args.dtype != "fp32"
            step = _train_step(model, opt, path, x1, labels, amp, args.torch_dtype)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = common.time_ms(step, dev, args.warmup, args.iters)
            rows.append({"bench": NAME, "part": "train", "model": name, "arch": kind, "genes": genes,
                         "shape": ("base{base_channels} mult{channel_mult}".format(**opts) if kind == "unet"
                                   else "width{width} depth{depth}".format(**opts)).replace(" ", "_"),
                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
                         "precision": "bf16-autocast" if amp else "fp32", "ms_per_step": ms,
                         "cells_per_s": batch / (ms / 1e3),
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else "",
                         "threads": torch.get_num_threads(), "iters": args.iters})
            del model, opt, step
    return rows


# ---- data: generated h5ad (block-repeated) and shards ---------------------------------------------------------

def _block(genes: int, cells: int):
    from phenoflow.data.synthetic_counts import generate_counts
    from phenoflow.data.synthetic_counts_effects import CountSpec

    return generate_counts(CountSpec.for_genes(genes, seed=0), cells)


def write_big_h5ad(path: Path, block, repeats: int) -> int:
    """An h5ad of `repeats` copies of `block` (obs renamed r<copy>_<name>), written block by block: obs and var
    whole (small), X and layers['counts'] appended one block at a time. Returns the file size in bytes."""
    import anndata as ad
    import h5py
    import pandas as pd

    obs = pd.concat([block.obs.set_axis([f"r{k}_{n}" for n in block.obs_names]) for k in range(repeats)])
    for c in block.obs.columns:  # keep categoricals categorical
        if isinstance(block.obs[c].dtype, pd.CategoricalDtype):
            obs[c] = pd.Categorical(obs[c], categories=block.obs[c].cat.categories)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", block.var)
        ad.io.write_elem(f, "X", block.X)
        f.create_group("layers").attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        ad.io.write_elem(f["layers"], "counts", block.layers["counts"])
        ad.io.write_elem(f, "uns", dict(block.uns))
        for k in ("obsm", "varm", "obsp", "varp"):
            f.create_group(k).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        X, C = ad.io.sparse_dataset(f["X"]), ad.io.sparse_dataset(f["layers"]["counts"])
        for _ in range(repeats - 1):
            X.append(block.X)
            C.append(block.layers["counts"])
    return path.stat().st_size


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _child(code: str, *argv: str) -> dict:
    """Run `code` in a fresh Python (the repo on sys.path); its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(common.REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                       cwd=common.REPO, check=False)
    if r.returncode:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


CONVERT = """
import json, sys, time
from phenoflow.data.expression_shards import convert_anndata
t = time.perf_counter()
convert_anndata(sys.argv[1], sys.argv[2], samples_per_shard=int(sys.argv[3]), workers=1)
hwm = [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mb': hwm}))
"""

TRAIN = """
import json, sys, threading, time
import torch
from phenoflow.config import resolve
from phenoflow.train.trainer import Trainer
folder, out, steps, batch, smoke = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == '1'
ov = ['data.source=shards', f'data.shards={folder}', 'train.device=cpu', 'train.precision=fp32',
      f'train.batch_size={batch}', f'train.total_samples={batch * steps}', f'train.log_every_samples={batch}',
      f'train.ckpt_every_samples={batch * steps}', f'run.out_dir={out}', 'run.name=mem']
if smoke:
    ov += ['model.unet_base_channels=8', 'model.unet_channel_mult=[1,2]']
def rss():
    return [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith(('VmRSS:', 'VmHWM:'))]
torch.manual_seed(0)
before = rss()[1]
t = time.perf_counter()
tr = Trainer(resolve('expression-demo', ov))
tr.fit()
hwm, now = rss()[0], rss()[1]
print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mb': hwm, 'rss_after_imports_mb': before,
                  'genes': len(tr.manifest['genes']), 'cells': tr.manifest['splits']['train']['count']}))
"""


# ---- part 2: loader ------------------------------------------------------------------------------------------

class BackedBatches:
    """Map-style dataset: item b = batch b of `rows` read from the h5ad in anndata backed mode (module doc)."""

    def __init__(self, path: str, rows, batch: int):
        self.path, self.rows, self.batch, self.adata = path, rows, batch, None

    def __len__(self) -> int:
        return len(self.rows) // self.batch

    def __getitem__(self, b: int):
        import anndata as ad
        import numpy as np
        import torch

        if self.adata is None:  # opened in the reading process (h5py handles do not survive a fork)
            self.adata = ad.read_h5ad(self.path, backed="r")
            self.codes = self.adata.obs["condition"].cat.codes.to_numpy()
            self.ct = self.adata.obs["cell_type"].cat.codes.to_numpy()
        rows = self.rows[b * self.batch:(b + 1) * self.batch]
        order = np.argsort(rows)
        m = self.adata.X[rows[order]]
        x = np.empty((len(rows), self.adata.n_vars), np.float32)
        x[order] = m.toarray()
        return {"x": torch.from_numpy(x), "perturbation": torch.from_numpy(self.codes[rows].astype(np.int64)),
                "cell_type": torch.from_numpy(self.ct[rows].astype(np.int64))}


def _drain(it, keys: list | None = None) -> tuple[int, float]:
    n, t0 = 0, None
    for i, b in enumerate(it):
        if keys is not None:
            keys += b["key"]
        if i == 0:  # first batch carries the start-up (worker spawn, file opening)
            t0 = time.perf_counter()
            continue
        n += b["x"].shape[0]
    return n, time.perf_counter() - t0


def bench_loader(args, tmp: Path) -> list[dict]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from phenoflow.data.expression_shards import convert_anndata
    from phenoflow.data.loader import ShardLoader

    torch.set_num_threads(1)  # as in bench_loader.py: measure the loader, not the machine's thread pool
    block = _block(args.loader_genes, min(BLOCK_CELLS, args.loader_cells))
    h5 = tmp / "loader.h5ad"
    size = write_big_h5ad(h5, block, max(1, args.loader_cells // block.n_obs))
    shards = tmp / "loader_shards"
    man = convert_anndata(str(h5), shards, samples_per_shard=max(256, args.loader_cells // 8))
    n_cells = man["splits"]["train"]["count"]
    runs: dict[tuple[str, int, int, bool], list[float]] = {}
    for rnd in range(args.rounds):
        for w in args.workers:
            loader = ShardLoader(shards, "train", args.batch, num_workers=w, seed=rnd, infinite=False)
            for epoch in (0, 1):  # 0: every member's crc32 checked (checksums=first_pass); 1: checked already
                keys: list[str] = []
                n, dt = _drain(iter(loader), keys)  # the next iter() is the loader's next epoch
                runs.setdefault(("shards", w, epoch, epoch == 0), []).append(n / dt)
                rows_order = np.asarray([int(k[1:]) for k in keys], np.int64)  # key c<row>: the h5ad row
                ds = BackedBatches(str(h5), rows_order, args.batch)
                n, dt = _drain(iter(DataLoader(ds, batch_size=None, shuffle=False, num_workers=w)))
                runs.setdefault(("h5ad_backed", w, epoch, False), []).append(n / dt)
            # Like for like with the h5ad, which checks nothing: epoch 0 (same order) with checksums off.
            n, dt = _drain(iter(ShardLoader(shards, "train", args.batch, num_workers=w, seed=rnd, infinite=False,
                                            checksums="off")))
            runs.setdefault(("shards", w, 0, False), []).append(n / dt)
    out = []
    for (backend, w, epoch, crc), rates in runs.items():
        base = runs[("h5ad_backed", w, epoch, False)]
        rate = float(np.median(rates))
        out.append({"bench": NAME, "part": "loader", "backend": backend, "workers": w, "epoch": epoch,
                    "crc_checked": crc, "genes": args.loader_genes,
                    "cells": n_cells, "batch": args.batch, "rounds": len(rates), "cells_per_s": rate,
                    "cells_per_s_min": min(rates), "cells_per_s_max": max(rates),
                    "cells_per_s_per_worker": rate / max(w, 1),
                    "speedup_vs_h5ad_backed": float(np.median([a / b for a, b in zip(rates, base)])),
                    "file_mb": size / 1e6, "shards_mb": _du(shards) / 1e6, "page_cache": "warm"})
    return out


# ---- part 3: peak memory -------------------------------------------------------------------------------------

def bench_memory(args, tmp: Path) -> list[dict]:
    block = _block(args.mem_genes, min(BLOCK_CELLS, args.mem_cells))
    out = []
    sizes = [("one_block", 1), ("big", max(1, args.mem_cells // block.n_obs))]
    if args.smoke:
        sizes = sizes[1:]
    for label, reps in sizes:
        h5 = tmp / f"mem_{label}.h5ad"
        t = time.perf_counter()
        size = write_big_h5ad(h5, block, reps)
        write_s = time.perf_counter() - t
        folder = tmp / f"mem_{label}_shards"
        conv = _child(CONVERT, str(h5), str(folder), str(args.mem_per_shard))
        h5.unlink()
        train = _child(TRAIN, str(folder), str(tmp / f"run_{label}"), str(args.mem_steps), str(args.mem_batch),
                       "1" if args.smoke else "0")
        out.append({"bench": NAME, "part": "memory", "case": label, "model": "unet_cpu" if not args.smoke else "tiny",
                    "genes": train["genes"], "cells": train["cells"], "batch": args.mem_batch,
                    "steps": args.mem_steps, "file_mb": size / 1e6, "write_s": write_s,
                    "shards_mb": _du(folder) / 1e6, "convert_s": conv["seconds"],
                    "convert_peak_rss_mb": conv["peak_rss_mb"], "train_s": train["seconds"],
                    "peak_rss_mb": train["peak_rss_mb"], "rss_after_imports_mb": train["rss_after_imports_mb"],
                    "file_over_peak": size / 1e6 / (train["peak_rss_mb"] * 1.048576)})
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0], warmup=2, iters=5)
    p.add_argument("--parts", nargs="+", default=["train", "loader", "memory"],
                   choices=["train", "loader", "memory"])
    p.add_argument("--genes", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--train-batch", default=None,
                   help="per-model batch, e.g. unet_ref=8,unet_cpu=32,mlp=256 (default: that on CPU, 256 on GPU)")
    p.add_argument("--loader-cells", type=int, default=65536)
    p.add_argument("--loader-genes", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256, help="loader batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mem-cells", type=int, default=196608, help="cells of the big h5ad (x 2,000 genes: ~2.9 GB)")
    p.add_argument("--mem-genes", type=int, default=2000)
    p.add_argument("--mem-steps", type=int, default=10)
    p.add_argument("--mem-batch", type=int, default=64)
    p.add_argument("--mem-per-shard", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the train part on CPU (1: stable on shared, loaded cores)")
    args = common.finish_args(p.parse_args(argv))
    gpu = args.device.type == "cuda"
    batches = ({"unet_ref": 256, "unet_cpu": 256, "mlp": 256} if gpu else
               {"unet_ref": 8, "unet_cpu": 32, "mlp": 256})
    if args.train_batch:
        batches.update({k: int(v) for k, v in (kv.split("=") for kv in args.train_batch.split(","))})
    args.train_batch = batches
    if args.smoke:
        args.genes, args.train_batch = [64], {k: 4 for k in MODELS}
        args.loader_cells, args.loader_genes, args.batch, args.workers, args.rounds = 512, 64, 64, [0], 1
        args.mem_cells, args.mem_genes, args.mem_steps, args.mem_batch, args.mem_per_shard = 1024, 64, 2, 16, 256
    tmp = Path(tempfile.mkdtemp(prefix="bench_expression_"))
    rows: list[dict] = []
    try:
        for part, fn in (("train", lambda: bench_train(args)), ("loader", lambda: bench_loader(args, tmp)),
                         ("memory", lambda: bench_memory(args, tmp))):
            if part in args.parts:
                t = time.perf_counter()
                got = fn()
                print(f"# part {part}: {time.perf_counter() - t:.1f} s", flush=True)
                load = os.getloadavg()[0]  # other jobs on the machine: read the CPU rows with this
                rows += [{**r, "smoke": args.smoke, **common.stamp(args.device), "cpu_cores": os.cpu_count(),
                          "loadavg_1m": load} for r in got]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
