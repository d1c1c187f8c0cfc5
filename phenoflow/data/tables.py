"""Per-shard label tables: a shard's keys, labels, doses, control flags and image checksums as columns.

`<shard>.labels.json` = {"format": "phenoflow-labels-v1", "count": N, "key": [...], "perturbation": [...],
"experiment": [...], "cell_type": [...], "dose": [...], "is_control": [...], "crc32": [...]} in index order. The
label columns copy the json members' values; `crc32` (written since the checksum change; optional, so tables
written before it still load) holds `zlib.crc32` of each sample's image member bytes as stored in the tar (the
encoded bytes: raw pixels, the .npy file or the PNG). A shard record whose manifest entry has
`"checksum": "crc32"` promises that column; the loader then checks image bytes against it (docs/data.md).
The .idx files stay byte-identical to DALI's wds2idx, which is why the checksums live here.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MissingShardError
from .vocab import LABEL_GROUPS, Vocab

LABELS_FORMAT = "phenoflow-labels-v1"
LABEL_COLUMNS = ("key", *LABEL_GROUPS, "dose", "is_control")  # columns of a shard's label table
CHECKSUM = "crc32"  # the per-sample checksum column (and the manifest record's "checksum" value)


def payload_crc(data: Any) -> int:
    """The per-sample checksum: zlib.crc32 of an image member's bytes (any buffer: bytes, memoryview, a
    C-contiguous uint8 array). ~12 us per 55 KB sample (4.5 GB/s) on the 2-core CI machine."""
    return zlib.crc32(data)


def label_columns(groups: Sequence[str] = LABEL_GROUPS) -> tuple[str, ...]:
    """The columns of a label table whose label groups are `groups` (images: LABEL_COLUMNS; expression shards:
    the perturbation, each covariate and the dataset, see expression_shards.py)."""
    return ("key", *groups, "dose", "is_control")


def write_label_table(path: str | Path, columns: dict[str, list[Any]],
                      names: Sequence[str] = LABEL_COLUMNS) -> Path:
    """Write a shard's label table atomically: {"format", "count", one list per column of `names` (default
    LABEL_COLUMNS), and "crc32" when `columns` has it}."""
    path = Path(path)
    n = len(columns["key"])
    table = {"format": LABELS_FORMAT, "count": n, **{c: list(columns[c]) for c in names}}
    if CHECKSUM in columns:
        table[CHECKSUM] = [int(x) for x in columns[CHECKSUM]]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, separators=(",", ":")))
    tmp.replace(path)
    return path


def read_label_table(path: str | Path, count: int, checksums: bool = False,
                     names: Sequence[str] = LABEL_COLUMNS) -> dict[str, list[Any]]:
    """Read and check a shard's label table (format, count, every column of `count` entries; with `checksums`
    the crc32 column too, which must then be there). Returns the columns `names` (default LABEL_COLUMNS) plus
    "crc32" when present. A MissingShardError names the file, the field and the command that rebuilds the tables. Values are checked
    where they are used (the loader), sample by sample."""
    p = Path(path)
    rebuild = f"rebuild the folder's tables with `phenoflow data labels {p.parent}`"
    try:
        t = json.loads(p.read_text())
    except FileNotFoundError:
        raise MissingShardError(f"label table {p} listed in the manifest is missing ({rebuild})") from None
    except (ValueError, OSError) as e:
        raise MissingShardError(f"label table {p}: not valid JSON: {e} ({rebuild})") from None
    if not isinstance(t, dict) or t.get("format") != LABELS_FORMAT:
        got = t.get("format") if isinstance(t, dict) else type(t).__name__
        raise MissingShardError(f"label table {p}: format is {got!r}, not {LABELS_FORMAT!r} ({rebuild})")
    columns = [*names, CHECKSUM] if checksums or CHECKSUM in t else list(names)
    for c in columns:
        if not isinstance(t.get(c), list) or len(t[c]) != count:
            got = len(t[c]) if isinstance(t.get(c), list) else "no"
            why = " (the manifest says this shard has checksums)" if c == CHECKSUM and checksums else ""
            raise MissingShardError(f"label table {p}: column {c!r} has {got} entries, the shard has {count}{why} "
                                    f"({rebuild})")
    if CHECKSUM in columns:
        bad = next((i for i, x in enumerate(t[CHECKSUM]) if not isinstance(x, int) or not 0 <= x < 1 << 32), None)
        if bad is not None:
            raise MissingShardError(f"label table {p}: crc32 of key {t['key'][bad]!r} is {t[CHECKSUM][bad]!r}, not "
                                    f"an unsigned 32-bit integer ({rebuild})")
    return {c: t[c] for c in columns}


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


class LabelTable:
    """A shard's label table mapped through the vocabularies once: label indexes (count, 3), doses, control
    flags and keys as arrays, and `ok[j]` False for a sample whose entry is unusable (unknown label, missing or
    non-finite dose, missing flag); reading such a sample raises or skips with the message of the json path."""

    def __init__(self, cols: dict[str, list[Any]], vocabs: dict[str, Vocab], keys: list[str], shard: str):
        if cols["key"] != keys:
            j = next(i for i, (a, b) in enumerate(zip(cols["key"], keys)) if a != b)
            raise MissingShardError(f"shard {shard}: its label table lists key {cols['key'][j]!r} at position {j}, "
                                    f"its index {keys[j]!r}")
        self.cols = cols
        n = len(keys)
        self.lab = np.empty((n, len(LABEL_GROUPS)), np.int64)
        ok = np.ones(n, bool)
        for i, g in enumerate(LABEL_GROUPS):
            self.lab[:, i] = vocabs[g].indices(cols[g])
            ok &= self.lab[:, i] >= 0
        self.dose = np.asarray([_as_float(d) for d in cols["dose"]], np.float64)  # as the json path: float(dose)
        ok &= np.isfinite(self.dose)
        ok &= np.asarray([c is not None for c in cols["is_control"]], bool)
        self.ctrl = np.asarray([bool(c) for c in cols["is_control"]], bool)
        self.keys = np.asarray(keys, dtype=object)
        self.ok = ok.tolist()
        self.crc: list[int] | None = cols.get(CHECKSUM)  # crc32 of each image member, or None (older tables)

    def meta(self, j: int) -> dict[str, Any]:
        """Sample j's entry as json-member fields (missing values left out), for the error message."""
        return {c: self.cols[c][j] for c in self.cols if self.cols[c][j] is not None}
