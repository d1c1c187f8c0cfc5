"""`phenoflow data plan`: storage and I/O arithmetic for a data set (a manifest, or a stated size and shape).

Per sample a shard holds two tar members (json metadata, image), each a 512-byte header plus data padded to
512 bytes. Raw and npy sizes are exact; png sizes are measured on a few synthetic crops of the same shape
(real microscopy compresses differently: pass --bytes-per-image to use a measured figure).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .shards import encode_image, load_manifest

JSON_BYTES = 400  # typical metadata member (key, labels, shape, channel names)
TARGET_SHARD_BYTES = 1 << 30  # ~1 GiB shards: few files, large sequential reads, cheap index files


def _member(n: float) -> float:
    return 512 + -(-n // 512) * 512


def bytes_per_sample(shape: tuple[int, int, int], encoding: str) -> float:
    h, w, c = shape
    if encoding == "raw":
        img = h * w * c
    elif encoding == "npy":
        img = len(encode_image(np.zeros(shape, np.uint8), "npy"))
    else:
        from .synthetic import SyntheticSpec, generate_synthetic

        spec = SyntheticSpec(image_size=h, channels=c if c in (3, 6) else 6)
        x, _ = generate_synthetic(spec, 8)
        img = float(np.mean([len(encode_image(im[:, :w, :c], "png")) for im in x]))
    return _member(JSON_BYTES) + _member(img)


def plan(manifest_dir: str | Path | None = None, images: int = 12_000_000, shape: str | tuple = "96x96x6",
         encoding: str = "raw", samples_per_shard: int = 0, gpus: int = 32, images_per_s_per_gpu: float = 21.0,
         bytes_per_image: float = 0.0) -> dict[str, Any]:
    """The plan as a dict (all sizes in bytes, rates in bytes/s, times in seconds)."""
    if manifest_dir:
        m = load_manifest(manifest_dir)
        recs = [r for s in m["splits"].values() for r in s["shards"]]
        images = sum(r["count"] for r in recs)
        total = float(sum(r["bytes"] for r in recs))
        shp = tuple(m["image_shape"])
        encoding = m["encoding"]
        per = total / max(images, 1)
        n_shards = len(recs)
        sps = int(np.median([r["count"] for r in recs])) if recs else 0
    else:
        shp = tuple(int(s) for s in shape.lower().split("x")) if isinstance(shape, str) else tuple(shape)
        if len(shp) != 3:
            raise ValueError(f"shape {shape!r} must be HxWxC, e.g. 96x96x6")
        per = bytes_per_image or bytes_per_sample(shp, encoding)
        total = per * images
        sps = samples_per_shard or max(1, int(TARGET_SHARD_BYTES // per))
        n_shards = -(-images // sps)
    rate = images_per_s_per_gpu * per
    return {"images": images, "image_shape": list(shp), "encoding": encoding, "bytes_per_sample": per,
            "total_bytes": total, "samples_per_shard": sps, "shards": n_shards, "shard_bytes": per * sps,
            "gpus": gpus, "images_per_s_per_gpu": images_per_s_per_gpu, "read_bytes_per_s_per_gpu": rate,
            "read_bytes_per_s_total": rate * gpus, "epoch_seconds": images / (images_per_s_per_gpu * gpus),
            "shards_per_gpu": n_shards / gpus}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n}"


def format_plan(p: dict[str, Any]) -> str:
    h = p["epoch_seconds"] / 3600
    return "\n".join([
        f"data set:        {p['images']:,} images of {'x'.join(map(str, p['image_shape']))} ({p['encoding']})",
        f"per sample:      {_size(p['bytes_per_sample'])} in the shards (tar headers and json included)",
        f"total:           {_size(p['total_bytes'])}",
        (f"shards:          {p['shards']:,} of {p['samples_per_shard']:,} samples (~{_size(p['shard_bytes'])} each),"
        f" {p['shards_per_gpu']:.1f} per GPU"),
        (f"read rate:       {_size(p['read_bytes_per_s_per_gpu'])}/s per GPU at {p['images_per_s_per_gpu']:g} images/s;"
        f" {_size(p['read_bytes_per_s_total'])}/s for {p['gpus']} GPUs"),
        f"epoch time:      {p['epoch_seconds']:,.0f} s ({h:.2f} h) on {p['gpus']} GPUs",
    ])
