"""Make the data a run needs: synthetic shards written once (and reused), or a checked existing shard folder."""
from __future__ import annotations

import fcntl
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from .shards import ShardWriter, build_manifest, load_manifest, write_manifest
from .synthetic import (
    SyntheticSpec,
    cell_type_names,
    channel_names,
    experiment_names,
    iter_synthetic,
    labels_of,
    perturbation_names,
)
from .vocab import Vocab

SYNTH_SPLITS = ("train", "val")


def spec_from_config(cfg: Config) -> SyntheticSpec:
    d = cfg.data
    return SyntheticSpec(image_size=d.image_size, channels=d.channels, num_perturbations=d.num_perturbations,
                         num_experiments=d.num_experiments, num_cell_types=d.num_cell_types, seed=d.synth_seed)


def _write_one_shard(args: tuple[SyntheticSpec, str, str, int, int, int, str]) -> dict[str, Any]:
    """Generate samples [start, start + n) of a split and write them as shard number `shard_no` (one process)."""
    spec, out_dir, split, shard_no, start, n, encoding = args
    w = ShardWriter(out_dir, split, samples_per_shard=n, encoding=encoding, channels=channel_names(spec.channels),
                    start_shard=shard_no)
    for images, metas in iter_synthetic(spec, n, split, start_index=start):
        for img, m in zip(images, metas):
            w.write(img, m)
    (rec,) = w.close()
    return rec


def write_synthetic(spec: SyntheticSpec, out_dir: str | Path, counts: dict[str, int], samples_per_shard: int,
                    encoding: str = "raw", workers: int = 1) -> dict[str, Any]:
    """Write synthetic splits as shards (each shard an independent index range, so shards can be made in
    parallel processes) and the manifest. Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the manifest, written last, marks a complete folder
    for old in list(out.glob("*.tar")) + list(out.glob("*.idx")) + list(out.glob("*.labels.json")):
        old.unlink()
    jobs = [(spec, str(out), split, j, start, min(samples_per_shard, n - start), encoding)
            for split, n in counts.items() if n > 0
            for j, start in enumerate(range(0, n, samples_per_shard))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as ex:
            recs = list(ex.map(_write_one_shard, jobs))
    else:
        recs = [_write_one_shard(j) for j in jobs]
    records = {s: [r for r in recs if r["split"] == s] for s, n in counts.items() if n > 0}
    names = {"perturbation": perturbation_names(spec), "experiment": experiment_names(spec),
             "cell_type": cell_type_names(spec)}
    vocabs = {g: Vocab(v, name=g) for g, v in names.items()}
    label_counts = {}
    for split, n in counts.items():  # labels are a pure function of the index: count them without images
        c: dict[str, Counter] = {g: Counter() for g in names}
        for i in range(n):
            k, e, t, _ = labels_of(spec, i)
            c["perturbation"][names["perturbation"][k]] += 1
            c["experiment"][names["experiment"][e]] += 1
            c["cell_type"][names["cell_type"][t]] += 1
        label_counts[split] = {g: dict(sorted(v.items())) for g, v in c.items()}
    source = {"kind": "synthetic", "spec": spec.to_dict(), "counts": dict(counts),
              "samples_per_shard": samples_per_shard}
    manifest = build_manifest(records, vocabs, (spec.image_size, spec.image_size, spec.channels),
                              channel_names(spec.channels), encoding, label_counts, source)
    write_manifest(out, manifest)
    return manifest


def prepare_data(cfg: Config, workers: int | None = None) -> Path:
    """data.source == "synthetic": shards under cfg.run_dir / "data", reused when the manifest matches the spec.
    data.source == "shards": cfg.data.shards after checking its manifest against data.image_size/channels."""
    d = cfg.data
    if d.source == "synthetic":
        out = cfg.run_dir / "data"
        spec = spec_from_config(cfg)
        counts = {"train": d.train_images, "val": d.val_images}
        want = {"kind": "synthetic", "spec": spec.to_dict(), "counts": counts, "samples_per_shard": d.samples_per_shard}
        out.mkdir(parents=True, exist_ok=True)
        # An exclusive lock: several processes (e.g. the ranks of one job) may call this at once; the first
        # writes, the others wait and then find a matching manifest.
        with open(out / ".prepare.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if load_manifest(out).get("source") == want:
                    return out
            except (FileNotFoundError, ValueError):
                pass
            # One process by default: this runs inside the trainer, where forking after torch has started
            # threads is not safe; `phenoflow data synth --workers N` makes large sets in parallel.
            write_synthetic(spec, out, counts, d.samples_per_shard, workers=workers or 1)
        return out
    if d.source == "shards":
        folder = Path(d.shards)
        try:
            m = load_manifest(folder)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.shards={d.shards!r}: {e}") from e
        h, w, c = m["image_shape"]
        if (h, w) != (d.image_size, d.image_size):
            raise ConfigError(f"data.image_size={d.image_size} but the shards in {folder} hold {h}x{w} images: set "
                              f"data.image_size={h} (or 0: the manifest's)")
        if c != d.channels:
            raise ConfigError(f"data.channels={d.channels} but the shards in {folder} hold {c}-channel images: set "
                              f"data.channels={c} (or 0: the manifest's)")
        return folder
    raise ConfigError(f"data.source={d.source!r} is not one of ['synthetic', 'shards']")
