"""Integrity of a shard folder: `verify_shards` (CLI `phenoflow data verify DIR`), the index checked against the
tar's members, label tables checked against (and rebuilt from) the json and image members.

What verify checks, per shard of the manifest (the first failure raises a ShardError naming the shard, and the
key where there is one):
  - the tar, index and label table are there; the tar has the manifest's size; the index the manifest's count;
  - the index against the tar's members (names, data offsets, sizes; read from the tar headers): a stale index,
    whose offsets would make a loader read the wrong bytes, fails here naming the first key that differs;
  - with checksums (the default; `--no-checksums` skips this full read): every label table entry against its json
    member, every image member against the table's crc32 (tables written since the checksum change), and the
    tar's sha256 against the manifest's.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ChecksumError, ShardError
from .shards import (
    EXT_TO_ENCODING,
    _sha256,
    index_rows,
    load_manifest,
    manifest_groups,
    payload_exts,
    read_index,
    tar_index_rows,
    write_manifest,
)
from .tables import (
    CHECKSUM,
    LABEL_COLUMNS,
    label_columns,
    payload_crc,
    read_label_table,
    write_label_table,
)
from .vocab import LABEL_GROUPS


def check_index(folder: str | Path, record: dict[str, Any]) -> None:
    """The shard's index must list exactly the tar's members (names, data offsets, sizes), sample by sample, as
    DALI's wds2idx would write it; a ShardError names the shard and the first key that differs."""
    folder = Path(folder)
    tar, idx = folder / record["name"], folder / record["index"]
    have, want = index_rows(idx), tar_index_rows(tar)
    for i in range(max(len(have), len(want))):
        a = have[i] if i < len(have) else None
        b = want[i] if i < len(want) else None
        if a != b:
            key = (a or b)[0][3].split(".", 1)[0]
            said = " ".join(f"{n}@{o}+{s}" for _, o, s, n in a) if a else "nothing (it ends here)"
            has = " ".join(f"{n}@{o}+{s}" for _, o, s, n in b) if b else "nothing (it ends here)"
            raise ShardError(f"shard {tar}: its index {idx.name} does not match the tar at key {key} (sample {i}): "
                             f"the index says {said}, the tar has {has} (member@offset+size). A stale index makes "
                             f"loaders read the wrong bytes; rebuild it with `phenoflow data index {tar}`")


def label_table_from_tar(folder: str | Path, record: dict[str, Any], checksums: bool = True,
                         groups: Sequence[str] = LABEL_GROUPS,
                         exts: Sequence[str] = tuple(EXT_TO_ENCODING)) -> dict[str, list[Any]]:
    """The label table a shard's members give (what the writer writes; used to rebuild and verify): the label
    columns (of label groups `groups`) from the json members and, with `checksums`, the crc32 of every payload
    member (extensions `exts`: images by default)."""
    import json

    folder = Path(folder)
    names = label_columns(groups)
    cols: dict[str, list[Any]] = {c: [] for c in (*names, *([CHECKSUM] if checksums else []))}
    with open(folder / record["name"], "rb") as f:
        for e in read_index(folder / record["index"]):
            img = next((x for x in exts if x in e), None)
            if "json" not in e or (checksums and img is None):
                raise ShardError(f"shard {record['name']}, key {e['__key__']}: missing "
                                 f"{'json' if 'json' not in e else 'image'} member")
            off, size = e["json"]
            f.seek(off)
            try:
                meta = json.loads(f.read(size))
                if not isinstance(meta, dict):
                    raise ValueError(f"a {type(meta).__name__}, not an object")  # noqa: TRY004
            except ValueError as err:
                raise ShardError(f"shard {record['name']}, key {e['__key__']}: json member: {err}") from None
            for c in names:  # a missing field stays missing (null) so the loader reports that sample
                v = meta.get(c)
                cols[c].append(str(v) if c in groups and v is not None else v)
            if checksums:
                off, size = e[img]
                f.seek(off)
                data = f.read(size)
                if len(data) != size:
                    raise ShardError(f"shard {record['name']}, key {e['__key__']}: the tar file ends early")
                cols[CHECKSUM].append(payload_crc(data))
    return cols


def rebuild_label_tables(folder: str | Path) -> int:
    """(Re)write every shard's label table of a manifest from its members (labels from the json members, crc32 of
    the image members as they are now: run `data verify` first, whose sha256 check vouches for those bytes) and
    list it in the manifest. Returns the number of tables written."""
    folder = Path(folder)
    m = load_manifest(folder)
    groups, exts = manifest_groups(m), payload_exts(m)
    n = 0
    for s in m["splits"].values():
        for rec in s["shards"]:
            name = rec.get("labels") or rec["name"].rsplit(".tar", 1)[0] + ".labels.json"
            write_label_table(folder / name, label_table_from_tar(folder, rec, True, groups, exts),
                              label_columns(groups))
            rec["labels"], rec["checksum"] = name, CHECKSUM
            n += 1
    write_manifest(folder, m)
    return n


def _same_value(a: Any, b: Any) -> bool:
    """Equal, NaN counting as equal to NaN (a NaN dose is copied as NaN)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))


def verify_shards(folder: str | Path, checksums: bool = True, progress: bool = False) -> dict[str, int]:
    """Check every shard of a manifest (see the module docstring). Returns the sample count per split.
    progress: a bar / periodic lines on stderr, one step per shard (phenoflow.progress; the CLI sets it)."""
    from phenoflow.progress import Progress

    folder = Path(folder)
    m = load_manifest(folder)
    groups, exts = manifest_groups(m), payload_exts(m)
    names = label_columns(groups)
    counts = {}
    bar = Progress(sum(len(s["shards"]) for s in m["splits"].values()), "verify", "shards", enabled=progress)
    for split, s in m["splits"].items():
        for rec in s["shards"]:
            p = folder / rec["name"]
            if not p.is_file():
                raise ShardError(f"shard {p} listed in the manifest is missing")
            if p.stat().st_size != rec["bytes"]:
                raise ShardError(f"shard {p} has {p.stat().st_size} bytes, the manifest says {rec['bytes']}")
            if len(index_rows(folder / rec["index"])) != rec["count"]:
                raise ShardError(f"shard {p}: its index {rec['index']} lists a number of samples other than the "
                                 f"manifest's {rec['count']}")
            check_index(folder, rec)
            if rec.get("labels"):
                table = read_label_table(folder / rec["labels"], rec["count"], rec.get("checksum") == CHECKSUM,
                                         names)
                if checksums:  # the table must say what the members say, sample by sample
                    from_tar = label_table_from_tar(folder, rec, CHECKSUM in table, groups, exts)
                    _compare_tables(folder / rec["labels"], p, table, from_tar, names, m.get("modality", "image"))
            if checksums and _sha256(p) != rec["sha256"]:
                raise ShardError(f"shard {p}: sha256 differs from the manifest's (the tar changed after it was "
                                 "written)")
            bar.update(1)
        counts[split] = s["count"]
    bar.close()
    return counts


def _compare_tables(path: Path, tar: Path, table: dict[str, list[Any]], from_tar: dict[str, list[Any]],
                    names: Sequence[str] = LABEL_COLUMNS, payload: str = "image") -> None:
    if CHECKSUM in table:
        bad = next((i for i, (a, b) in enumerate(zip(table[CHECKSUM], from_tar[CHECKSUM])) if a != b), None)
        if bad is not None:
            raise ChecksumError(f"shard {tar}, key {from_tar['key'][bad]}: the {payload} member's crc32 is "
                                f"{from_tar[CHECKSUM][bad]:08x}, its label table {path.name} recorded "
                                f"{table[CHECKSUM][bad]:08x} when the shard was written: the {payload} bytes are "
                                "damaged")
    for c in names:
        bad = next((i for i, (a, b) in enumerate(zip(table[c], from_tar[c])) if not _same_value(a, b)), None)
        if bad is not None:
            raise ShardError(f"label table {path}: {c} of key {from_tar['key'][bad]} is {table[c][bad]!r}, its "
                             f"json member says {from_tar[c][bad]!r}")
