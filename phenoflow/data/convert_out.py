"""The output folder of `phenoflow data convert`: refusing a non-empty folder, clearing it with --overwrite, the
per-label counts file and the short summary printed at the end.

Rules (docs/data.md, "Converting"):
  - a folder that holds anything is refused unless `overwrite`; the error names the folder, a few of its entries
    and the option (--overwrite);
  - with `overwrite`, only what a conversion writes may be there (manifest.json, shards: .tar/.idx/.labels.json,
    label_counts.csv, their hidden temporary files, and every file the old manifest lists); anything else (a
    sub-folder, a notes file) is refused, named, before anything is deleted: the folder must end up holding this
    conversion's files and nothing else;
  - replacing a previous conversion writes the new one into a hidden staging folder inside `out`
    (.convert-<pid>/) first: a conversion that fails (bad rows, a dead worker) removes the staging folder and
    leaves the previous conversion as it was. Only once the new manifest is written is the old one replaced:
    manifest.json is removed FIRST (from then on the folder has no manifest, which every reader treats as "no
    shard folder here": a crash in this step leaves a clearly incomplete folder, never a mix of old and new
    shards under a manifest), then the old files, then the new files are moved in (same file system: renames)
    with manifest.json last.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import ConvertError

LABEL_COUNTS = "label_counts.csv"
SKIPPED_ROWS = "skipped_rows.csv"  # with --bad-sample-policy skip: every skipped row (csv, row, column, value, reason)
_OUTPUT = re.compile(r"^(manifest\.json|label_counts\.csv|skipped_rows\.csv|[A-Za-z0-9_\-]+-\d{6}\.(tar|idx|labels\.json)"
                     r"|\..*tmp.*|\.manifest\.json\.tmp.*)$")
_STAGING = re.compile(r"^\.convert-\d+$")  # a staging folder (of a conversion that crashed: deleted too)


def _listed(out: Path) -> set[str]:
    """Files the folder's manifest lists (shards, indexes, label tables), if it has a readable one."""
    try:
        m = json.loads((out / "manifest.json").read_text())
        return {rec[k] for s in m["splits"].values() for rec in s["shards"] for k in ("name", "index", "labels")
                if isinstance(rec.get(k), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder a conversion may not write into (see the module docstring); deletes nothing."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out}: exists and is not a folder")
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConvertError(f"--out {out} is not empty ({shown}); nothing was written. Pass --overwrite to replace "
                           "a previous conversion there, or choose an empty or new folder")
    listed = _listed(out) if entries else set()
    foreign = [e for e in entries if not (_STAGING.match(e) and (out / e).is_dir())
               and (not (_OUTPUT.match(e) or e in listed) or (out / e).is_dir())]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConvertError(f"--out {out} holds files that no conversion writes ({shown}); --overwrite deletes only "
                           "a previous conversion's files (manifest, shards, label counts): move those away or "
                           "choose another folder. Nothing was deleted")


def clear_previous(out: Path, overwrite: bool) -> None:
    """check_out, then delete a previous conversion's files in place (manifest.json first): for converters that
    write straight into `out` (anndata); the image converters stage instead (start_output)."""
    check_out(out, overwrite)
    if out.is_dir():
        _clear(out)


def _clear(out: Path, keep: str = "") -> None:
    """Delete a previous conversion's files in `out` (manifest.json first), except the entry `keep`."""
    (out / "manifest.json").unlink(missing_ok=True)  # first: the folder is now clearly incomplete
    for e in sorted(os.listdir(out)):
        if e == keep:
            continue
        if (out / e).is_dir():
            shutil.rmtree(out / e, ignore_errors=True)  # a crashed conversion's staging folder
        else:
            (out / e).unlink(missing_ok=True)


def start_output(out: Path, overwrite: bool) -> Path:
    """check_out, create `out`, and return where the shards are to be written: `out` itself when it is empty,
    else (a previous conversion to replace) a new staging folder inside it (finish_output moves it in)."""
    check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        return out
    stage = out / f".convert-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def finish_output(dest: Path, out: Path) -> None:
    """After a complete conversion in `dest`: nothing to do when it is `out`; else replace out's previous
    conversion by the staged one (module docstring: manifest removed first, new manifest moved in last)."""
    if dest == out:
        return
    _clear(out, keep=dest.name)
    names = sorted(os.listdir(dest), key=lambda n: n == "manifest.json")  # the manifest last
    for n in names:
        os.replace(dest / n, out / n)
    dest.rmdir()


def abandon_output(dest: Path, out: Path) -> None:
    """A failed conversion: remove its staging folder (the previous conversion in `out` stays as it was)."""
    if dest != out:
        shutil.rmtree(dest, ignore_errors=True)


def write_label_counts(out: Path, label_counts: dict[str, dict[str, dict[str, int]]]) -> Path:
    """label_counts.csv: split, group, label, count (one line per label of each split and label group)."""
    path = out / LABEL_COUNTS
    tmp = out / f".{LABEL_COUNTS}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "group", "label", "count"])
        for split, groups in sorted(label_counts.items()):
            for group, counts in groups.items():
                for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                    w.writerow([split, group, label, n])
    tmp.replace(path)
    return path


def write_skipped_rows(out: Path, problems: list[dict[str, Any]]) -> Path:
    """skipped_rows.csv: one line per skipped bad row (csv, row, column, value, reason), in row order."""
    path = out / SKIPPED_ROWS
    tmp = out / f".{SKIPPED_ROWS}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["csv", "row", "column", "value", "reason"])
        for p in sorted(problems, key=lambda p: p["row"]):
            w.writerow([p["csv"], p["row"], p["column"], p["value"], p["reason"]])
    tmp.replace(path)
    return path


def summary_text(s: dict[str, Any], top: int = 5) -> str:
    """The short summary of a conversion for people (counts per split, top labels, skipped rows, files)."""
    h, w, c = s["image_shape"]
    n = sum(s["splits"].values())
    lines = [(f"converted {n:,} images ({h}x{w}x{c}, {s['encoding']}) from {s['csv']} (images: {s['image_root']}) "
              f"into {s['out']} in {s['seconds']:.1f}s"),
             "  splits: " + ", ".join(f"{k} {v:,} ({s['shards'][k]} shard{'s' if s['shards'][k] != 1 else ''})"
                                      for k, v in s["splits"].items())]
    totals: dict[str, dict[str, int]] = {}
    for groups in s["label_counts"].values():
        for g, counts in groups.items():
            for label, k in counts.items():
                totals.setdefault(g, {})[label] = totals.get(g, {}).get(label, 0) + k
    for g, counts in totals.items():
        best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        more = f", ... ({len(counts) - top} more)" if len(counts) > top else ""
        lines.append(f"  {g}: {len(counts):,} label{'s' if len(counts) != 1 else ''}; top: "
                     + ", ".join(f"{k} {v:,}" for k, v in best) + more)
    if s["skipped"]:
        reasons = ", ".join(f"{r} {k}" for r, k in sorted(s["skipped_by_reason"].items()))
        lines.append(f"  skipped {s['skipped']:,} bad rows ({reasons}), listed in {s['skipped_file']}; first: "
                     f"{s['skipped_samples'][0]}")
    else:
        lines.append("  skipped rows: none")
    lines.append(f"  per-label counts of every split: {s['label_counts_file']}")
    return "\n".join(lines)
