"""Shard format v1: WebDataset tar shards, a DALI-compatible index per shard, and a dataset manifest.

Layout of a shard folder (see docs/data.md)::

    manifest.json              format, version, image shape, encoding, channel names, vocabularies,
                               per split: sample count and shard list (name, count, bytes, sha256, index)
    train-000000.tar           WebDataset tar: per sample `<key>.json` then `<key>.<ext>`
    train-000000.idx           index in DALI's wds2idx format v1.2 (data offsets and sizes of every member)
    train-000000.labels.json   label table: the shard's keys, labels, doses and control flags as columns (a copy
                               of the json members' fields, so a loader gets a shard's labels in one parse) and
                               the crc32 of every image member (tables.py; checked by the loader and by verify)
    val-000000.tar ...

Sample members (the key has no dots; WebDataset groups members by the text before the first dot):
    <key>.json   metadata: key, shape [H, W, C], dtype "uint8", encoding, perturbation, experiment, cell_type,
                 dose (float, 0.0 when not applicable), smiles (str or null), is_control, split, plus source fields
    <key>.img    encoding "raw": the H*W*C uint8 bytes of the HWC array, C-order
    <key>.npy    encoding "npy": a .npy file of the uint8 HWC array
    <key>.png    encoding "png": 8-bit PNG; RGB for C = 3, otherwise grayscale with the C channels tiled side by
                 side (H x (W*C), channel c in columns c*W .. (c+1)*W - 1)

Every shard, index and the manifest is written to a temporary name and renamed, so a crash never leaves a
half-written file under a final name. Label tables are in tables.py; verification (index against tar members,
checksums, tables against json members) and table rebuilding in integrity.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (  # noqa: F401  re-exported: the shard errors were defined here before errors.py
    ChecksumError,
    DataError,
    ManifestError,
    MissingManifestError,
    MissingShardError,
    ShardError,
)
from .npy import read_uint8_npy
from .shard_index import (  # noqa: F401  re-exported: the index readers were defined here before
    ENCODINGS,
    EXT_TO_ENCODING,
    INDEX_VERSION,
    index_array,
    index_rows,
    index_tar,
    read_index,
    tar_index_rows,
)
from .tables import (  # noqa: F401  re-exported for callers of the earlier single-module layout
    CHECKSUM,
    LABEL_COLUMNS,
    LABELS_FORMAT,
    label_columns,
    payload_crc,
    read_label_table,
    write_label_table,
)
from .vocab import CONTROL, LABEL_GROUPS, Vocab

FORMAT = "phenoflow-shards"
VERSION = 1
# Fields every manifest of a modality has (image manifests have no "modality" field; expression_shards.py).
MODALITY_FIELDS = {"image": ("image_shape", "channels", "vocabs", "splits", "encoding"),
                   "expression": ("genes", "label_groups", "columns", "vocabs", "splits", "encoding")}
PAYLOAD_EXTS = {"image": tuple(EXT_TO_ENCODING), "expression": ("csr",)}  # payload member extensions


# ----------------------------------------------------------------------------------------------------------
# Image encodings.


def encode_image(img: np.ndarray, encoding: str = "raw") -> bytes:
    """uint8 HWC array -> bytes in the given encoding."""
    if encoding == "raw":
        return np.ascontiguousarray(img).tobytes()
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
        return buf.getvalue()
    if encoding == "png":
        from PIL import Image

        h, w, c = img.shape
        # RGB as is; any other channel count tiled side by side into one grayscale image (H, W*C).
        arr = img if c == 3 else np.ascontiguousarray(img.transpose(0, 2, 1).reshape(h, c * w))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown image encoding {encoding!r} (known: {sorted(ENCODINGS)})")


def decode_image(data: bytes, ext: str, shape: Sequence[int]) -> np.ndarray:
    """Bytes of member `<key>.<ext>` -> uint8 HWC array of `shape`; ValueError when they do not fit or do not
    decode (every decoder failure: Pillow's OSError / SyntaxError / zlib errors, numpy's header and EOF errors)."""
    try:
        h, w, c = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape {shape!r} is not [H, W, C]") from None
    if ext == "img":
        if len(data) != h * w * c:
            raise ValueError(f"raw image has {len(data)} bytes, expected {h}*{w}*{c} = {h * w * c}")
        return np.frombuffer(data, np.uint8).reshape(h, w, c)
    if ext not in ("npy", "png"):
        raise ValueError(f"unknown image member extension {ext!r} (known: {sorted(EXT_TO_ENCODING)})")
    try:
        if ext == "npy":
            arr = read_uint8_npy(data)  # not np.load: see phenoflow/data/npy.py
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im)
            if arr.ndim == 2 and arr.shape == (h, w * c):
                arr = arr.reshape(h, c, w).transpose(0, 2, 1)
    except (MemoryError, SystemError):  # the interpreter's trouble, not this sample's damage
        raise
    except Exception as e:  # noqa: BLE001  untrusted bytes: any decoder failure is this sample's damage
        raise ValueError(f"the {ext} member does not decode ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"the {ext} member holds a {type(arr).__name__}, not an array")  # noqa: TRY004
    if arr.ndim == 2 and c == 1:
        arr = arr[:, :, None]
    if tuple(arr.shape) != (h, w, c):
        raise ValueError(f"image has shape {tuple(arr.shape)}, expected {(h, w, c)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image has dtype {arr.dtype}, expected uint8")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------------------
# Writing.


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_key(key: str) -> str:
    if not key or "." in key or "/" in key or len(key) > 90:
        raise ValueError(f"sample key {key!r} must be non-empty, at most 90 characters, without '.' or '/'")
    return key


class ShardWriter:
    """Writes one split's samples into `<prefix>-NNNNNN.tar` shards of `samples_per_shard` samples, atomically.

    ``write(image, meta)`` appends one sample; ``close()`` finishes the last shard and returns the shard records
    (name, split, count, bytes, sha256, index) for the manifest. Other payloads (expression_shards.py) subclass
    it with their own `encodings`, `groups` and `write`, which hands the encoded member to ``write_member``.
    """

    payload = "image"
    encodings = ENCODINGS  # encodings this writer accepts (encoding -> member extension)
    groups: tuple[str, ...] = LABEL_GROUPS  # label groups: counted, and copied into the label table

    def __init__(self, out_dir: str | Path, split: str, samples_per_shard: int, encoding: str = "raw",
                 channels: Sequence[str] | None = None, prefix: str | None = None, start_shard: int = 0):
        if encoding not in self.encodings:
            raise ValueError(f"unknown {self.payload} encoding {encoding!r} (known: {sorted(self.encodings)})")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.out_dir, self.split, self.encoding = Path(out_dir), split, encoding
        self.samples_per_shard, self.channels = samples_per_shard, list(channels) if channels else None
        self.prefix = prefix or split
        self.shard_no = start_shard
        self.records: list[dict[str, Any]] = []
        self.columns = label_columns(self.groups)
        self.label_counts: dict[str, Counter] = {g: Counter() for g in self.groups}
        self._tar: tarfile.TarFile | None = None
        self._index: list[str] = []
        self._columns: dict[str, list[Any]] = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self.shard_no:06d}"
        self._tmp = self.out_dir / f".{self._name}.tar.tmp{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115  closed in _finish
        self._index, self._count = [], 0
        self._columns = {c: [] for c in (*self.columns, CHECKSUM)}

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        # addfile copies `info`; recover the data offset: header blocks = written - padded data.
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded, len(data)

    def write(self, image: np.ndarray, meta: dict[str, Any]) -> None:
        key = _check_key(str(meta["key"]))
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"sample {key!r}: image must be uint8 HWC, got {image.dtype} {image.shape}")
        if self._tar is None:
            self._open()
        m = dict(meta)
        m.update(key=key, shape=list(image.shape), dtype="uint8", encoding=self.encoding, split=self.split)
        m.setdefault("dose", 0.0)
        m.setdefault("smiles", None)
        m.setdefault("is_control", m.get("perturbation") == CONTROL)
        if self.channels:
            m.setdefault("channels", self.channels)
        for g in LABEL_GROUPS:
            if g not in m:
                raise ValueError(f"sample {key!r}: metadata lacks the label {g!r}")
            self.label_counts[g][str(m[g])] += 1
        self.write_member(key, m, encode_image(image, self.encoding))

    def write_member(self, key: str, m: dict[str, Any], data: bytes) -> None:
        """Append one sample: its json member `m` (with every label-table column), then its payload `data` as
        `<key>.<ext>`; index line, label-table row and the payload's crc32. The shard closes when full."""
        if self._tar is None:
            self._open()
        ext = self.encodings[self.encoding]
        # json first, payload second; the index lists both with their data offsets.
        parts = [("json", *self._add(f"{key}.json", json.dumps(m).encode())),
                 (ext, *self._add(f"{key}.{ext}", data))]
        self._index.append(" ".join(f"{e} {off} {size} {key}.{e}" for e, off, size in parts))
        for c in self.columns:  # the label table holds exactly what the json member says
            self._columns[c].append(str(m[c]) if c in self.groups else m[c])
        self._columns[CHECKSUM].append(payload_crc(data))  # of the bytes as stored: checked on every read path
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        tar_path = self.out_dir / f"{self._name}.tar"
        idx_path = self.out_dir / f"{self._name}.idx"
        idx_tmp = self.out_dir / f".{self._name}.idx.tmp{os.getpid()}"
        idx_tmp.write_text(f"{INDEX_VERSION} {self._count}\n" + "\n".join(self._index) + "\n")
        labels_path = write_label_table(self.out_dir / f"{self._name}.labels.json", self._columns, self.columns)
        rec = {"name": tar_path.name, "index": idx_path.name, "labels": labels_path.name, "checksum": CHECKSUM,
               "split": self.split, "count": self._count, "bytes": self._tmp.stat().st_size,
               "sha256": _sha256(self._tmp)}
        idx_tmp.replace(idx_path)  # index and label table first: a final .tar name always has both
        self._tmp.replace(tar_path)
        self.records.append(rec)
        self.shard_no += 1

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.records

    def __enter__(self) -> ShardWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the shard being written (its temporary tar); shards already finished stay."""
        if self._tar is not None:
            try:
                self._tar.close()
            except OSError:  # e.g. the write limit that made the writer fail
                pass
            self._tar = None
            self._tmp.unlink(missing_ok=True)


def build_vocabs(metadata: Iterable[dict[str, Any]]) -> dict[str, Vocab]:
    """Vocabularies over all samples (all splits): sorted names, "control" first for perturbations."""
    seen: dict[str, set[str]] = {g: set() for g in LABEL_GROUPS}
    for m in metadata:
        for g in LABEL_GROUPS:
            seen[g].add(str(m[g]))
    return {g: Vocab.build(seen[g], name=g, first=CONTROL if g == "perturbation" else None) for g in LABEL_GROUPS}


def build_manifest(records: dict[str, list[dict[str, Any]]], vocabs: dict[str, Vocab], image_shape: Sequence[int],
                   channels: Sequence[str], encoding: str = "raw",
                   label_counts: dict[str, dict[str, dict[str, int]]] | None = None,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest dict: shards and counts per split, vocabularies, channel names, image shape, checksums."""
    if len(channels) != image_shape[2]:
        raise ValueError(f"{len(channels)} channel names {list(channels)} for images of shape {list(image_shape)}")
    return {
        "format": FORMAT, "version": VERSION,
        "image_shape": [int(s) for s in image_shape], "dtype": "uint8", "encoding": encoding,
        "channels": list(channels),
        "vocabs": {g: v.names for g, v in vocabs.items()},
        "splits": {s: {"count": sum(r["count"] for r in recs), "shards": recs} for s, recs in records.items()},
        "label_counts": label_counts or {},
        "source": source or {},
    }


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    p = Path(out_dir) / "manifest.json"
    tmp = p.with_name(f".manifest.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(p)
    return p


def write_shards(images: np.ndarray | Sequence[np.ndarray], metadata: Sequence[dict[str, Any]], out_dir: str | Path,
                 samples_per_shard: int = 1024, *, channels: Sequence[str] | None = None, encoding: str = "raw",
                 vocabs: dict[str, Vocab] | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write images (N, H, W, C) uint8 with their metadata (one dict per image, with "split") as shards.

    Samples keep their order within each split. Vocabularies are built once over all splits unless given (then
    every label must be in them). Returns the manifest, also written to out_dir/manifest.json.
    """
    if len(images) != len(metadata):
        raise ValueError(f"write_shards: {len(images)} images but {len(metadata)} metadata records")
    if len(images) == 0:
        raise ValueError("write_shards: no samples to write")
    shape = tuple(int(s) for s in images[0].shape)
    channels = list(channels) if channels else _default_channels(shape[2])
    vocabs = vocabs or build_vocabs(metadata)
    writers: dict[str, ShardWriter] = {}
    for img, m in zip(images, metadata):
        if tuple(img.shape) != shape:
            raise ValueError(f"sample {m.get('key')!r}: shape {tuple(img.shape)} differs from the first image's {shape}")
        for g in LABEL_GROUPS:
            vocabs[g].index(str(m[g]))  # unknown label -> error naming label and vocabulary
        split = str(m.get("split", "train"))
        if split not in writers:
            writers[split] = ShardWriter(out_dir, split, samples_per_shard, encoding, channels)
        writers[split].write(img, m)
    records = {s: w.close() for s, w in writers.items()}
    counts = {s: {g: dict(sorted(c.items())) for g, c in w.label_counts.items()} for s, w in writers.items()}
    manifest = build_manifest(records, vocabs, shape, channels, encoding, counts, source)
    write_manifest(out_dir, manifest)
    return manifest


def _default_channels(c: int) -> list[str]:
    from .synthetic import channel_names

    return channel_names(c) if c in (3, 6) else [f"ch{i + 1}" for i in range(c)]


# ----------------------------------------------------------------------------------------------------------
# Reading.


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check `folder/manifest.json`; errors name the file and the missing or bad field."""
    p = Path(folder) / "manifest.json"
    if not p.is_file():
        raise MissingManifestError(f"no shard manifest at {p} (not a shard folder, or its conversion did not finish)")
    try:
        m = json.loads(p.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise ManifestError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ManifestError(f"{p}: format is {got!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ManifestError(f"{p}: version {m.get('version')!r} is not supported (this code reads {VERSION})")
    modality = m.get("modality", "image")  # image manifests predate the field
    if modality not in MODALITY_FIELDS:
        raise ManifestError(f"{p}: modality {modality!r} is not supported (known: {sorted(MODALITY_FIELDS)})")
    for field in MODALITY_FIELDS[modality]:
        if field not in m:
            raise ManifestError(f"{p}: missing field {field!r}")
    for g in manifest_groups(m):
        if g not in m["vocabs"]:
            raise ManifestError(f"{p}: vocabs lacks the group {g!r}")
    return m


def manifest_groups(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The label groups of a manifest: LABEL_GROUPS for images, `label_groups` for expression shards."""
    return tuple(manifest.get("label_groups", LABEL_GROUPS))


def payload_exts(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The member extensions that hold a sample's payload (image or expression row) in this manifest's shards."""
    return PAYLOAD_EXTS[manifest.get("modality", "image")]


def manifest_vocabs(manifest: dict[str, Any]) -> dict[str, Vocab]:
    return {g: Vocab(manifest["vocabs"][g], name=g) for g in manifest_groups(manifest)}


def split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in the manifest (splits: {sorted(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def iter_shard(folder: str | Path, record: dict[str, Any], shape: Sequence[int]) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (image, metadata) of every sample of one shard, in order (through its index)."""
    folder = Path(folder)
    entries = read_index(folder / record["index"])
    with open(folder / record["name"], "rb") as f:
        for e in entries:
            yield read_sample(f, e, record["name"], shape)


def read_sample(f: Any, entry: dict[str, Any], shard: str, shape: Sequence[int]) -> tuple[np.ndarray, dict]:
    """Read one sample's json and image members at their indexed offsets; errors name shard and key."""
    key = entry["__key__"]
    img_ext = next((e for e in EXT_TO_ENCODING if e in entry), None)
    if "json" not in entry or img_ext is None:
        raise ShardError(f"shard {shard}, key {key}: missing {'json' if 'json' not in entry else 'image'} member")
    try:
        (jo, js), (io_, is_) = entry["json"], entry[img_ext]
        f.seek(jo)
        meta_bytes = f.read(js)
        f.seek(io_)
        data = f.read(is_)
        if len(meta_bytes) != js or len(data) != is_:
            raise ValueError("the tar file ends early (truncated shard)")
        meta = json.loads(meta_bytes)
        if not isinstance(meta, dict):
            raise ValueError(f"json member is a {type(meta).__name__}, not an object")  # noqa: TRY004
        return decode_image(data, img_ext, meta.get("shape", shape)), meta
    except (ValueError, OSError) as e:
        raise ShardError(f"shard {shard}, key {key}: {e}") from e
