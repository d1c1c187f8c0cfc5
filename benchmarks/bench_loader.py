"""Benchmark: loader throughput, samples/s per worker, for 96x96x6 crops (raw and png shards, both backends)
against the one-.npy-per-crop baseline (a PyTorch Dataset that np.loads one file per sample, as IMPA/CellFlux do).

Rows (benchmarks/results/loader.csv, with device, commit, date):
  backend    webdataset (phenoflow ShardLoader, index-based reads in a DataLoader) | dali (fn.readers.webdataset;
             CPU pipeline without CUDA) | npy_files (the baseline)
  encoding   raw | png | npy (baseline)
  layout     contiguous (B, C, H, W) batches | channels_last (the webdataset backend's copy-free view)
  checksums  the webdataset backend's check of image bytes against the label tables' crc32: first_pass (the
             default: each sample until it has passed once per loader, so in the first of the --epochs epochs
             only), always, off; every --checksums policy is measured for raw channels_last, the trainer's
             layout, and the default for the other variants ("-" for the baseline and DALI, which do not check)
  workers    DataLoader worker processes (0 = the main process; DALI: pipeline threads)
  samples_per_s (median of --rounds interleaved repetitions; _min/_max beside it), samples_per_s_per_worker
  (divided by max(workers, 1)), speedup_vs_npy_files (median over rounds of the ratio to the baseline at the
  same worker count and layout measured in the same round), rss_mb_per_worker (largest resident set of a worker
  process, or of the main process for workers = 0, mid-run; includes pages shared with the parent, e.g.
  torch) and private_mb_per_worker (its unshared pages: what each further worker costs).
The data are written just before they are read, so reads come from the page cache: this measures the loader's
CPU cost (tar/index reads, decoding, batching), not the storage. Shuffling is on (default window 1000). Each
measurement reads --epochs epochs through one iterator (the baseline: a RandomSampler over as many samples).
Run:  python benchmarks/bench_loader.py [--smoke] [--workers 0 1 2] [--images 8192] [--checksums off always]
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

NAME = "loader"


def _rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _private_mb(pid: int | str = "self") -> float:
    """Memory the process does not share (private clean + dirty pages): what one more worker costs."""
    try:
        kb = sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                 if line.startswith(("Private_Clean:", "Private_Dirty:")))
        return kb / 1024
    except OSError:
        return float("nan")


def _children() -> list[int]:
    pids = []
    for t in Path("/proc/self/task").glob("*/children"):
        pids += [int(x) for x in t.read_text().split()]
    return pids


class NpyFiles:
    """The baseline: one .npy per crop listed in a CSV, read with np.load per sample (map-style Dataset); the
    DataLoader's default collate stacks the samples. Layout contiguous: each sample permuted to CHW, so the stack
    is a dense (B, C, H, W) batch; channels_last: HWC samples stacked, the batch permuted to a (B, C, H, W) view
    (no transposing copy, the same saving the shard loader's channels_last layout makes)."""

    def __init__(self, csv_path: Path, channels_last: bool = False):
        with open(csv_path) as f:
            self.paths = [csv_path.parent / r["path"] for r in csv.DictReader(f)]
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        x = torch.from_numpy(np.load(self.paths[i]))
        return x if self.channels_last else x.permute(2, 0, 1)


def _channels_last_batches(it):
    for b in it:
        yield b.permute(0, 3, 1, 2)


def _make_data(root: Path, n: int, size: int, per_shard: int, encodings: list[str]) -> dict[str, Path]:
    import numpy as np

    from phenoflow.data.shards import write_shards
    from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic

    images, meta = generate_synthetic(SyntheticSpec(image_size=size, channels=6, num_perturbations=8), n, "train")
    out = {}
    for enc in encodings:
        out[enc] = root / enc
        write_shards(images, meta, out[enc], per_shard, encoding=enc)
    # The baseline layout: nested folders of .npy files plus a CSV.
    base = root / "npy"
    rows = []
    for i, img in enumerate(images):
        rel = f"plate{i // 1000}/well{(i // 100) % 10}/{i}.npy"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(base / rel, img)
        rows.append(rel)
    (base / "meta.csv").write_text("path\n" + "\n".join(rows) + "\n")
    out["npy"] = base / "meta.csv"
    return out


def _drain(it, max_batches: int, ref_rss: list[tuple[float, float]]) -> tuple[int, float]:
    n, t0 = 0, None
    for i, b in enumerate(it):
        x = b["image"] if isinstance(b, dict) else b
        if i == 0:  # first batch: start-up (worker spawn, pipeline build) is not counted
            t0 = time.perf_counter()
            continue
        n += x.shape[0]
        if i == max_batches // 2:
            pids = _children() or ["self"]
            ref_rss.append((max(_rss_mb(p) for p in pids), max(_private_mb(p) for p in pids)))
        if i >= max_batches:
            break
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0], warmup=0, iters=1)
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backends", nargs="+", default=["webdataset", "dali", "npy_files"])
    p.add_argument("--encodings", nargs="+", default=["raw", "png"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every variant (median)")
    p.add_argument("--epochs", type=int, default=2, help="epochs read per measurement")
    p.add_argument("--checksums", nargs="+", default=["first_pass", "always", "off"],
                   help="checksum policies measured for webdataset raw channels_last (others: first_pass)")
    args = common.finish_args(p.parse_args(argv))
    if args.smoke:
        args.images, args.batch, args.workers, args.rounds, args.epochs = 192, 32, [0], 1, 1
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    # One intra-op thread in the main process, as DataLoader workers have: on oversubscribed cores torch's
    # thread pool can make a batch copy 50x slower, which would measure the machine's load, not the loader.
    torch.set_num_threads(1)

    from phenoflow.data.loader import ShardLoader

    backends = list(args.backends)
    if "dali" in backends:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            backends.remove("dali")
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    rows: list[dict] = []
    try:
        data = _make_data(tmp, args.images, args.image_size, max(64, args.images // 8), args.encodings)
        # Timed: batches 1 .. max_batches (the first, with start-up, is not counted) over --epochs epochs, so the
        # one-off costs of an iterator (opening shards, first touch of buffers) weigh as in a long run.
        max_batches = args.epochs * (args.images // args.batch) - 1
        # The baseline first in every round, so each shard row has a same-round ratio.
        order = (["npy_files"] if "npy_files" in backends else []) + [b for b in backends if b != "npy_files"]
        def policy(b: str) -> str:
            return "first_pass" if b == "webdataset" else "-"

        variants = [(b, e, "contiguous", policy(b)) for b in order
                    for e in (["npy"] if b == "npy_files" else args.encodings)]
        if "npy_files" in backends:
            variants.append(("npy_files", "npy", "channels_last", "-"))
        if "webdataset" in backends:
            variants += [("webdataset", e, "channels_last", c) for e in args.encodings
                         for c in (args.checksums if e == "raw" else ["first_pass"])]
        # Rounds interleave every variant, so machine noise (a shared VM's neighbours) falls on all of them alike;
        # a row reports the median rate over rounds and the median of its per-round ratios to the baseline.
        runs: dict[tuple, list[tuple[float, float, tuple[float, float]]]] = {}
        for rnd in range(args.rounds):
            for w in args.workers:
                base = {"contiguous": float("nan"), "channels_last": float("nan")}
                for backend, enc, layout, checks in variants:
                    rss: list[tuple[float, float]] = []
                    if backend == "npy_files":
                        ds = NpyFiles(data["npy"], channels_last=layout == "channels_last")
                        g = torch.Generator().manual_seed(rnd)
                        it = iter(DataLoader(ds, batch_size=args.batch, sampler=RandomSampler(
                                                 ds, num_samples=args.epochs * len(ds), generator=g),
                                             num_workers=w))
                        if layout == "channels_last":
                            it = _channels_last_batches(it)
                    else:
                        it = iter(ShardLoader(data[enc], "train", args.batch, backend=backend,
                                              num_workers=w, seed=rnd, infinite=True,
                                              channels_last=layout == "channels_last",
                                              checksums="off" if checks == "-" else checks))
                    n, dt = _drain(it, max_batches, rss)
                    del it
                    rate = n / dt
                    if backend == "npy_files":
                        base[layout] = rate
                    mem = rss[0] if rss else (_rss_mb(), _private_mb())
                    runs.setdefault((backend, enc, layout, checks, w), []).append((rate, rate / base[layout], mem))
        for (backend, enc, layout, checks, w), rs in runs.items():
            rates = [r[0] for r in rs]
            rate = float(np.median(rates))
            rows.append({"bench": NAME, "backend": backend, "encoding": enc, "layout": layout, "workers": w,
                         "checksums": checks,
                         "image_shape": f"{args.image_size}x{args.image_size}x6", "batch": args.batch,
                         "samples": args.batch * max_batches, "rounds": len(rs), "samples_per_s": rate,
                         "samples_per_s_min": min(rates), "samples_per_s_max": max(rates),
                         "samples_per_s_per_worker": rate / max(w, 1),
                         "speedup_vs_npy_files": float(np.median([r[1] for r in rs])),
                         "rss_mb_per_worker": max(r[2][0] for r in rs),
                         "private_mb_per_worker": max(r[2][1] for r in rs),
                         "pipeline_device": "cuda" if backend == "dali" and torch.cuda.is_available() else "cpu",
                         "page_cache": "warm", "smoke": args.smoke, **common.stamp(args.device),
                         "cpu_cores": os.cpu_count()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.append_rows(NAME, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
