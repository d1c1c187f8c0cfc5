"""The public CSV layouts a converter reads (cellflux, mit, generic): CSV rows -> sample rows, and every bad row.

``read_rows(layout, csv_path, root, ...)`` returns (rows, problems). A row is a dict with the image path (and
the CSV column and value it came from), key, split and labels; a problem is a dict naming the CSV file, the row
(its line number, the header being line 1), the column, the value and the reason. Every row is read, so a CSV
with many bad rows is reported at once. Problems: a ragged row (more or fewer fields than the header), a missing
required value, a non-numeric, negative or missing dose (see convert.py's docstring), and an image path that
leaves the image root (an absolute path or `..` components), refused unless `allow_outside` (CLI
`--allow-outside-images`). The check is on the path as written (normalised, not following symlinks): links that
the image root itself holds are the user's own set-up and are followed.
The CSV is read as UTF-8, with or without a byte-order mark (Excel writes one).
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConvertError
from .vocab import CONTROL

CONTROL_NAMES = ("control", "ctrl", "dmso", "empty", "untreated", "non-targeting")
CONTROL_STATES = ("0", "control", "ctrl", "dmso", "false")


class RowError(Exception):
    """One bad CSV row: the column, its value and the reason (collected by read_rows)."""

    def __init__(self, column: str, value: Any, reason: str):
        super().__init__(reason)
        self.column, self.value, self.reason = column, value, reason


def problem(csv_path: Path | str, row: int, column: str, value: Any, reason: str) -> dict[str, Any]:
    return {"csv": str(csv_path), "row": row, "column": column, "value": value, "reason": reason}


def problem_line(p: dict[str, Any]) -> str:
    return f"{p['csv']}, row {p['row']}, column {p['column']}, value {p['value']!r}: {p['reason']}"


def conversion_failed(csv_path: Path | str, problems: list[dict[str, Any]], what: str, limit: int = 1000
                      ) -> ConvertError:
    """A ConvertError listing every problem (by row; the first `limit` in the message, all in `.problems`)."""
    problems = sorted(problems, key=lambda p: p["row"])
    n = len(problems)
    lines = [problem_line(p) for p in problems[:limit]]
    if n > limit:
        lines.append(f"... and {n - limit} more bad rows (ConvertError.problems lists them all)")
    head = f"{csv_path}: {n} bad row{'s' if n != 1 else ''}; {what}:"
    return ConvertError("\n".join([head, *lines]), problems)


def read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The header and (line number, row dict) of every data row. A row with more fields than the header has
    them under the key None, one with fewer has None values (read_rows reports both)."""
    if not path.is_file():
        raise ConvertError(f"metadata CSV {path} does not exist or is not a file")
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is not a column
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            for r in reader:
                rows.append((reader.line_num, r))
    except UnicodeDecodeError as e:
        raise ConvertError(f"metadata CSV {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                           "CSV") from None
    except csv.Error as e:
        raise ConvertError(f"metadata CSV {path}, row {len(rows) + 2}: not valid CSV ({e})") from None
    if not header:
        raise ConvertError(f"metadata CSV {path}: empty (no header line)")
    if not rows:
        raise ConvertError(f"metadata CSV {path}: no data rows")
    return header, rows


def _need(r: dict[str, Any], cols: Sequence[str]) -> str:
    for c in cols:
        if r.get(c) not in (None, ""):
            return r[c]
    have = [c for c in cols if c in r]
    raise RowError(" or ".join(cols), r.get(have[0]) if have else None,
                   "empty" if have else "missing (no such column in the header)")


def _dose(value: str | None, column: str, required: bool) -> float:
    """The dose of a row. Empty is 0.0 (not applicable) unless `required` (a non-control row of a layout whose
    CSV has a dose column): a missing dose must not silently become 0.0."""
    if value is None or str(value).strip() == "":
        if required:
            raise RowError(column, value or "", "the dose of a non-control row is empty")
        return 0.0
    try:
        d = float(value)
    except ValueError:
        raise RowError(column, value, f"dose {value!r} is not a number") from None
    if not np.isfinite(d) or d < 0:
        raise RowError(column, value, f"dose {value!r} must be a finite number >= 0")
    return d


def _label(name: str, is_control: bool, dose: float, with_dose: bool, has_dose: bool) -> str:
    """The perturbation label: "control", the name, or with `with_dose` (and a dose column) "<name>_<dose:g>"."""
    if is_control:
        return CONTROL
    return f"{name}_{dose:g}" if with_dose and has_dose else name


def cellflux_candidates(key: str) -> list[str]:
    """Relative .npy paths a CellFlux/IMPA key may map to (RxRx1 rule, BBBC021 rule, flat)."""
    out = []
    rest = key.split("-", 1)[1] if "-" in key else None
    if rest:  # RxRx1: U2OS-01_1_B02_s1_14 -> 01_1/B02/s1_14.npy
        p = rest.split("_")
        if len(p) >= 4:
            out.append(f"{p[0]}_{p[1]}/{p[2]}/{'_'.join(p[3:])}.npy")
    p = key.split("_")
    if len(p) >= 3:  # BBBC021: Week1_22123_1_11_3.0 -> Week1/22123/1_11_3.0.npy
        out.append(f"{p[0]}/{p[1]}/{'_'.join(p[2:])}.npy")
    out.append(f"{key}.npy")
    return out


def row_cellflux(r: dict[str, Any], root: Path, ctrl: set[str], with_dose: bool) -> dict[str, Any]:
    key = _need(r, ["SAMPLE_KEY"])
    if r.get("PATH"):
        path, pcol, pval = root / r["PATH"], "PATH", r["PATH"]
    else:
        cands = cellflux_candidates(key)
        rel = next((c for c in cands if inside(root, root / c) and (root / c).exists()), cands[0])
        path, pcol, pval = root / rel, "SAMPLE_KEY", key
    cpd = _need(r, ["CPD_NAME", "ANNOT"])
    state = str(r.get("STATE") or "").strip().lower()
    is_control = (state in CONTROL_STATES if state else False) or cpd.lower() in ctrl
    cell = r.get("CELL_TYPE") or (key.split("-", 1)[0] if "-" in key else "unknown")
    has_dose = "DOSE" in r  # BBBC021 has a DOSE column; RxRx1 (siRNA) has none and keeps dose 0.0
    dose = _dose(r.get("DOSE"), "DOSE", required=has_dose and not is_control)
    return {"path": path, "path_column": pcol, "path_value": pval, "source_key": key,
            "split": _need(r, ["SPLIT"]).strip().lower(),
            "perturbation": _label(cpd, is_control, dose, with_dose, has_dose),
            "source_perturbation": cpd, "compound": cpd, "experiment": _need(r, ["BATCH", "PLATE"]),
            "cell_type": cell, "dose": dose, "smiles": r.get("SMILES") or None, "is_control": is_control,
            # kept for evaluation by mechanism of action and plate (BBBC021): ANNOT, PLATE, BATCH as written
            "moa": r.get("ANNOT") or None, "plate": r.get("PLATE") or None, "batch": r.get("BATCH") or None}


def row_mit(r: dict[str, Any], root: Path, ctrl: set[str], with_dose: bool) -> dict[str, Any]:
    rel = _need(r, ["path"])
    pert = _need(r, ["perturbation_id"])
    dose, column = r.get("dose"), "dose"
    pwd = (r.get("perturbation_id_with_dose") or "").strip()
    if not dose and pwd:  # "<perturbation>_<dose>"
        column = "perturbation_id_with_dose"
        tail = pwd[len(pert) + 1:] if pwd.startswith(pert + "_") else ""
        dose = tail if re.fullmatch(r"[0-9.eE+-]+", tail) else None
    is_control = pert.lower() in ctrl
    # A dose is required for non-control rows when the CSV has a dose column or a perturbation_id_with_dose
    # that differs from perturbation_id (it claims a dose); otherwise (siRNA) the dose is 0.0.
    has_dose = "dose" in r or bool(pwd and pwd != pert)
    try:
        d = _dose(dose, column, required=has_dose and not is_control)
    except RowError as e:
        e.value = pwd if column != "dose" else e.value  # name the value as written
        raise
    label = _label(pert, is_control, d, with_dose, has_dose)
    if with_dose and pwd and not is_control:
        label = pwd  # the MiT code's own class name for the compound at this dose
    return {"path": root / rel, "path_column": "path", "path_value": rel,
            "source_key": Path(rel).with_suffix("").as_posix(), "split": _need(r, ["split", "SPLIT"]).strip().lower(),
            "perturbation": label, "source_perturbation": pert, "compound": pert,
            "experiment": _need(r, ["experiment_id"]), "cell_type": r.get("cell_type") or "unknown", "dose": d,
            "smiles": r.get("smiles") or None, "is_control": is_control}


def row_generic(r: dict[str, Any], root: Path, ctrl: set[str], with_dose: bool) -> dict[str, Any]:
    rel = _need(r, ["path"])
    pert = _need(r, ["perturbation"])
    flag = str(r.get("is_control") or "").strip().lower()
    is_control = flag in ("1", "true", "yes") if flag else pert.lower() in ctrl
    has_dose = "dose" in r
    dose = _dose(r.get("dose"), "dose", required=has_dose and not is_control)
    return {"path": root / rel, "path_column": "path", "path_value": rel,
            "source_key": r.get("key") or Path(rel).with_suffix("").as_posix(),
            "split": (r.get("split") or "train").strip().lower(),
            "perturbation": _label(pert, is_control, dose, with_dose, has_dose),
            "source_perturbation": pert, "compound": pert,
            "experiment": r.get("experiment") or "exp_01", "cell_type": r.get("cell_type") or "unknown",
            "dose": dose, "smiles": r.get("smiles") or None, "is_control": is_control}


LAYOUTS: dict[str, Callable[..., dict[str, Any]]] = {"cellflux": row_cellflux, "mit": row_mit, "generic": row_generic}
PROBE_ROWS = 32  # rows whose images decide the image root


def _relative_paths(layout: str, r: dict[str, Any]) -> list[str]:
    """The image paths (relative to an image root) a CSV row may name, for finding the root."""
    if layout == "cellflux":
        return [r["PATH"]] if r.get("PATH") else cellflux_candidates(r.get("SAMPLE_KEY") or "")
    return [r["path"]] if r.get("path") else []


def root_candidates(csv_path: Path) -> list[Path]:
    """Where the images of a CSV may live when --images is not given, in the order tried: the CSV's folder, its
    imgs/ and images/ subfolders, and (the public IMPA/CellFlux layout: metadata/ beside imgs/) the parent's imgs/,
    images/, the parent itself, and each folder directly inside the parent's imgs/."""
    d = csv_path.parent
    cands = [d, d / "imgs", d / "images", d.parent / "imgs", d.parent / "images", d.parent]
    sub = d.parent / "imgs"
    if sub.is_dir():
        cands += sorted(p for p in sub.iterdir() if p.is_dir())
    out: list[Path] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def find_image_root(layout: str, csv_path: Path, given: str | Path | None) -> tuple[Path, ConvertError | None]:
    """The image root: `given` (--images, which must be a folder), else the candidate of root_candidates(csv_path)
    holding most of the images of the CSV's first rows. When no candidate holds any, the CSV's folder and a
    ConvertError naming the folders tried and the option to pass (--images DIR); the caller raises it after
    reporting the CSV's own problems."""
    if given:
        if not Path(given).is_dir():
            raise ConvertError(f"--images {given}: not a folder (the image root of {csv_path})")
        return Path(given), None
    _, records = read_csv(csv_path)
    probe = [(line, _relative_paths(layout, r)) for line, r in records[:PROBE_ROWS]]
    probe = [(line, rels) for line, rels in probe if rels]
    if not probe:  # rows without a path: read_rows reports them
        return csv_path.parent, None
    tried = root_candidates(csv_path)
    counted = [(sum(any((c / rel).is_file() for rel in rels) for _, rels in probe), c) for c in tried if c.is_dir()]
    best = max((n for n, _ in counted), default=0)
    if best:
        return next(c for n, c in counted if n == best), None
    line, rels = probe[0]
    return csv_path.parent, ConvertError(
        f"{csv_path}: cannot find the images: none of the first {len(probe)} rows' images is in any of "
        f"{', '.join(str(c) for c in tried)} (row {line}: looked for {', '.join(rels[:3])}). Pass the folder that "
        "holds them with --images DIR (in the public IMPA/CellFlux download: the imgs/ folder beside metadata/)")


def inside(root: Path, path: Path) -> bool:
    """`path` is `root` or below it, judged on the normalised path as written (`..` resolved, links not)."""
    r = os.path.normpath(os.path.abspath(root))
    p = os.path.normpath(os.path.abspath(path))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def read_rows(layout: str, csv_path: Path, root: Path, control_names: Sequence[str] = CONTROL_NAMES,
              label_with_dose: bool = False, allow_outside: bool = False
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every row of the CSV in the layout's terms ("line" = its CSV line), and every bad row as a problem."""
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r} (known: {sorted(LAYOUTS)})")
    header, records = read_csv(csv_path)
    ctrl = {c.lower() for c in control_names}
    rows, problems = [], []
    for line, r in records:
        try:
            if None in r:  # more fields than the header: csv.DictReader files the rest under None
                raise RowError("(after the last)", r[None], f"{len(header) + len(r[None])} fields, the header "
                               f"has {len(header)} (a ragged row: an unquoted comma, or a missing header column?)")
            short = [c for c in header if r.get(c) is None]
            if short:
                raise RowError(short[0], None, f"{len(header) - len(short)} fields, the header has {len(header)} "
                               "(a ragged row)")
            row = LAYOUTS[layout](r, root, ctrl, label_with_dose)
            if not allow_outside and not inside(root, row["path"]):
                raise RowError(row["path_column"], row["path_value"],
                               f"the image path {os.path.normpath(row['path'])} is outside the image root {root} "
                               "(--images); pass --allow-outside-images if that is meant")
        except RowError as e:
            problems.append(problem(csv_path, line, e.column, e.value, e.reason))
            continue
        row["line"] = line
        rows.append(row)
    return rows, problems
