"""Converters from the public layouts users arrive with to shard format v1 (see docs/data.md).

Layouts:
  cellflux  CellFlux / IMPA: a CSV with SAMPLE_KEY, SPLIT, STATE, CPD_NAME, DOSE (BBBC021), BATCH or PLATE
            (optional ANNOT, SMILES, CELL_TYPE) and one .npy per crop under an image root. Keys map to paths:
            BBBC021 `Week1_22123_1_11_3.0` -> `Week1/22123/1_11_3.0.npy`; RxRx1 `U2OS-01_1_B02_s1_14` ->
            `01_1/B02/s1_14.npy` (cell type U2OS from the key); an optional `PATH` column overrides the rule.
  mit       the MiT code's CSV: path, experiment_id, perturbation_id, optional perturbation_id_with_dose,
            dose, cell_type, and a split column (split / SPLIT; train / iid / ood ...).
  generic   path, perturbation and optional key, experiment, cell_type, split, dose, smiles, is_control;
            images as .npy, .png or .tif/.tiff.

Every split is kept as written (lower-cased). Control rows (STATE 0/control/ctrl, or a perturbation named in
`control_names`) get the canonical perturbation name "control"; the source name is kept in `source_perturbation`
and `compound`. With label_with_dose=True non-control labels carry the dose ("<name>_<dose:g>"; MiT: the
perturbation_id_with_dose value). Doses: when the CSV has a dose column (DOSE / dose / a perturbation_id_with_dose
that claims one), an empty or unparseable dose of a non-control row is a ConvertError naming CSV, row and column;
layouts without one (siRNA) get dose 0.0.
Rows are shuffled within each split by `seed` before sharding (so every shard is a random sample of its split,
which the shard-level shuffle of the loaders relies on); `shuffle=False` keeps CSV order.
Images: uint8 HWC (CHW with C in 3/4/6 is transposed; 2-D is one channel). Integer images in [0, 255] and float
images with integral values in [0, 255] are cast; NaN/inf, values outside [0, 255], non-integral floats, a
shape differing from the first image's, or a missing file are bad samples: by default an error naming the CSV
row, key and file; with bad_sample_policy="skip" they are counted per reason, logged and listed in the summary.
Conversion runs shard by shard in `workers` processes and returns counts per split and label.
"""
from __future__ import annotations

import csv
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .shards import (
    ShardWriter,
    _default_channels,
    build_manifest,
    load_manifest,
    manifest_vocabs,
    write_manifest,
)
from .vocab import CONTROL, LABEL_GROUPS, Vocab

log = logging.getLogger("phenoflow.data")
CONTROL_NAMES = ("control", "ctrl", "dmso", "empty", "untreated", "non-targeting")
CONTROL_STATES = ("0", "control", "ctrl", "dmso", "false")


class ConvertError(ValueError):
    """Bad input to a converter; the message names the CSV row, field, key or file."""


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------
# Rows: every layout becomes a list of dicts with path, key, split and labels.


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise ConvertError(f"metadata CSV {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConvertError(f"{path}: no data rows")
    return rows


def _need(row: dict[str, str], cols: Sequence[str], csv_path: Path, line: int) -> str:
    for c in cols:
        if c in row and row[c] is not None and row[c] != "":
            return row[c]
    raise ConvertError(f"{csv_path}, row {line}: missing column {' or '.join(cols)}")


def _dose(value: str | None, csv_path: Path, line: int, column: str = "dose", required: bool = False) -> float:
    """The dose of a row. Empty is 0.0 (not applicable) unless `required` (a non-control row of a layout whose
    CSV has a dose column), where it is an error: a missing dose must not silently become 0.0."""
    if value is None or str(value).strip() == "":
        if required:
            raise ConvertError(f"{csv_path}, row {line}, column {column}: the dose of a non-control row is empty")
        return 0.0
    try:
        d = float(value)
    except ValueError:
        raise ConvertError(f"{csv_path}, row {line}, column {column}: dose {value!r} is not a number") from None
    if not np.isfinite(d) or d < 0:
        raise ConvertError(f"{csv_path}, row {line}, column {column}: dose {value!r} must be a finite number >= 0")
    return d


def _label(name: str, is_control: bool, dose: float, with_dose: bool, has_dose: bool) -> str:
    """The perturbation label: "control", the name, or with `with_dose` (and a dose column) "<name>_<dose:g>"."""
    if is_control:
        return CONTROL
    return f"{name}_{dose:g}" if with_dose and has_dose else name


def sanitize_key(key: str) -> str:
    """Sample keys may not contain '.', '/' or spaces (WebDataset splits members at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


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


def rows_cellflux(csv_path: Path, root: Path, control_names: Sequence[str],
                  label_with_dose: bool = False) -> list[dict[str, Any]]:
    out = []
    ctrl = {c.lower() for c in control_names}
    for line, r in enumerate(_read_csv(csv_path), start=2):
        key = _need(r, ["SAMPLE_KEY"], csv_path, line)
        if r.get("PATH"):
            path = root / r["PATH"]
        else:
            cands = cellflux_candidates(key)
            path = next((root / c for c in cands if (root / c).exists()), root / cands[0])
        cpd = _need(r, ["CPD_NAME", "ANNOT"], csv_path, line)
        state = str(r.get("STATE", "")).strip().lower()
        is_control = state in CONTROL_STATES if state else cpd.lower() in ctrl
        is_control = is_control or cpd.lower() in ctrl
        cell = r.get("CELL_TYPE") or (key.split("-", 1)[0] if "-" in key else "unknown")
        has_dose = "DOSE" in r  # BBBC021 has a DOSE column; RxRx1 (siRNA) has none and keeps dose 0.0
        dose = _dose(r.get("DOSE"), csv_path, line, "DOSE", required=has_dose and not is_control)
        out.append({"line": line, "path": path, "source_key": key,
                    "split": _need(r, ["SPLIT"], csv_path, line).strip().lower(),
                    "perturbation": _label(cpd, is_control, dose, label_with_dose, has_dose),
                    "source_perturbation": cpd, "compound": cpd,
                    "experiment": _need(r, ["BATCH", "PLATE"], csv_path, line), "cell_type": cell,
                    "dose": dose, "smiles": r.get("SMILES") or None, "is_control": is_control})
    return out


def rows_mit(csv_path: Path, root: Path, control_names: Sequence[str],
             label_with_dose: bool = False) -> list[dict[str, Any]]:
    out = []
    ctrl = {c.lower() for c in control_names}
    for line, r in enumerate(_read_csv(csv_path), start=2):
        rel = _need(r, ["path"], csv_path, line)
        pert = _need(r, ["perturbation_id"], csv_path, line)
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
        d = _dose(dose, csv_path, line, column, required=has_dose and not is_control)
        label = _label(pert, is_control, d, label_with_dose, has_dose)
        if label_with_dose and pwd and not is_control:
            label = pwd  # the MiT code's own class name for the compound at this dose
        out.append({"line": line, "path": root / rel, "source_key": Path(rel).with_suffix("").as_posix(),
                    "split": _need(r, ["split", "SPLIT"], csv_path, line).strip().lower(),
                    "perturbation": label, "source_perturbation": pert, "compound": pert,
                    "experiment": _need(r, ["experiment_id"], csv_path, line),
                    "cell_type": r.get("cell_type") or "unknown", "dose": d,
                    "smiles": r.get("smiles") or None, "is_control": is_control})
    return out


def rows_generic(csv_path: Path, root: Path, control_names: Sequence[str],
                 label_with_dose: bool = False) -> list[dict[str, Any]]:
    out = []
    ctrl = {c.lower() for c in control_names}
    for line, r in enumerate(_read_csv(csv_path), start=2):
        rel = _need(r, ["path"], csv_path, line)
        pert = _need(r, ["perturbation"], csv_path, line)
        flag = str(r.get("is_control", "")).strip().lower()
        is_control = flag in ("1", "true", "yes") if flag else pert.lower() in ctrl
        has_dose = "dose" in r
        dose = _dose(r.get("dose"), csv_path, line, "dose", required=has_dose and not is_control)
        out.append({"line": line, "path": root / rel, "source_key": r.get("key") or Path(rel).with_suffix("").as_posix(),
                    "split": (r.get("split") or "train").strip().lower(),
                    "perturbation": _label(pert, is_control, dose, label_with_dose, has_dose),
                    "source_perturbation": pert, "compound": pert,
                    "experiment": r.get("experiment") or "exp_01", "cell_type": r.get("cell_type") or "unknown",
                    "dose": dose, "smiles": r.get("smiles") or None, "is_control": is_control})
    return out


LAYOUTS = {"cellflux": rows_cellflux, "mit": rows_mit, "generic": rows_generic}


# ----------------------------------------------------------------------------------------------------------
# Images.


def load_image(path: Path) -> np.ndarray:
    """Read .npy / .png / .tif(f) as uint8 HWC, applying the documented casts; BadSample otherwise."""
    if not path.exists():
        raise BadSample("missing file", str(path))
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            try:
                import tifffile

                arr = tifffile.imread(path)
            except ImportError:
                from PIL import Image

                arr = np.asarray(Image.open(path))
        elif suffix == ".png":
            from PIL import Image

            arr = np.asarray(Image.open(path))
        else:
            raise BadSample("unsupported file type", f"{path} (use .npy, .png, .tif)")
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001  a corrupt file of any kind is a bad sample naming the file
        raise BadSample("unreadable file", f"{path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise BadSample("bad shape", f"{path}: shape {arr.shape} is not HxWxC")
    if arr.shape[0] in (3, 4, 6) and arr.shape[-1] not in (1, 3, 4, 6):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() > 255:
            raise BadSample("out of range", f"{path}: values in [{arr.min()}, {arr.max()}], expected [0, 255]")
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadSample("NaN", f"{path}: {int((~np.isfinite(arr)).sum())} NaN/inf values")
        if arr.min() < 0 or arr.max() > 255:
            raise BadSample("out of range", f"{path}: values in [{arr.min():.4g}, {arr.max():.4g}], expected [0, 255]")
        if not np.array_equal(arr, np.round(arr)):
            raise BadSample("non-integral", f"{path}: float values are not whole grey levels (rescale to 0..255)")
    else:
        raise BadSample("bad dtype", f"{path}: dtype {arr.dtype}")
    return np.ascontiguousarray(arr.astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------
# The conversion.


def _convert_shard(job: dict[str, Any]) -> dict[str, Any]:
    """One process: load the rows' images and write them as one shard; bad samples per policy."""
    w = ShardWriter(job["out"], job["split"], samples_per_shard=len(job["rows"]) + 1, encoding=job["encoding"],
                    channels=job["channels"], start_shard=job["shard_no"])
    skipped: list[dict[str, Any]] = []
    for r in job["rows"]:
        try:
            img = load_image(r["path"])
            if job["shape"] and tuple(img.shape) != tuple(job["shape"]):
                raise BadSample("wrong shape", f"{r['path']}: shape {img.shape}, expected {tuple(job['shape'])}")
        except BadSample as e:
            msg = f"{job['csv']}, row {r['line']}, key {r['source_key']}: {e}"
            if job["policy"] == "error":
                raise ConvertError(msg) from None
            skipped.append({"reason": e.reason, "message": msg})
            continue
        meta = {k: v for k, v in r.items() if k not in ("line", "path")}
        meta["source_path"] = str(r["path"])
        w.write(img, meta)
    recs = w.close()
    return {"split": job["split"], "record": recs[0] if recs else None, "labels": w.label_counts,
            "skipped": skipped}


def convert(layout: str, csv_path: str | Path, out_dir: str | Path, *, image_root: str | Path | None = None,
            samples_per_shard: int = 1024, encoding: str = "raw", workers: int = 1,
            channels: str | Sequence[str] | None = None, bad_sample_policy: str = "error", seed: int = 0,
            shuffle: bool = True, image_size: int = 0, control_names: Sequence[str] = CONTROL_NAMES,
            vocab_from: str | Path | None = None, label_with_dose: bool = False) -> dict[str, Any]:
    """Convert a layout to shards in out_dir; returns a summary with counts per split and label and skips.

    label_with_dose: a compound at each dose is its own perturbation class, as in the MiT code's BBBC021
    conditioning: non-control labels become "<name>_<dose:g>" (MiT layout: the perturbation_id_with_dose value
    when present); the name stays in `compound`, the dose in `dose`. Layouts without a dose keep the name.

    vocab_from: a shard folder whose vocabularies must be used (labels outside them are an error), e.g. to
    convert finetuning data with a pretraining run's vocabularies.
    """
    t0 = time.perf_counter()
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r} (known: {sorted(LAYOUTS)})")
    if bad_sample_policy not in ("error", "skip"):
        raise ConvertError(f"bad_sample_policy={bad_sample_policy!r} must be 'error' or 'skip'")
    csv_path, out = Path(csv_path), Path(out_dir)
    root = Path(image_root) if image_root else csv_path.parent
    rows = LAYOUTS[layout](csv_path, root, control_names, label_with_dose)
    # Keys: sanitised and unique.
    seen: dict[str, int] = {}
    for r in rows:
        r["key"] = sanitize_key(r["source_key"])
        if r["key"] in seen:
            raise ConvertError(f"{csv_path}: rows {seen[r['key']]} and {r['line']} give the same sample key "
                               f"{r['key']!r}")
        seen[r["key"]] = r["line"]
    # Vocabularies over all splits (or given), checked before any image is read.
    if vocab_from:
        vocabs = manifest_vocabs(load_manifest(vocab_from))
        for r in rows:
            for g in LABEL_GROUPS:
                try:
                    vocabs[g].index(str(r[g]))
                except ValueError as e:
                    raise ConvertError(f"{csv_path}, row {r['line']}, key {r['source_key']}: {e}") from None
    else:
        vocabs = {g: Vocab.build((r[g] for r in rows), g, first=CONTROL if g == "perturbation" else None)
                  for g in LABEL_GROUPS}
    # The expected shape: from image_size/channels when given, else the first readable image.
    shape = None
    for r in rows:
        try:
            shape = load_image(r["path"]).shape
            break
        except BadSample as e:
            if bad_sample_policy == "error":
                raise ConvertError(f"{csv_path}, row {r['line']}, key {r['source_key']}: {e}") from None
    if shape is None:
        raise ConvertError(f"{csv_path}: no readable image")
    if image_size and shape[:2] != (image_size, image_size):
        raise ConvertError(f"{csv_path}: images are {shape[0]}x{shape[1]}, expected {image_size}x{image_size}")
    chans = channels.split(",") if isinstance(channels, str) else list(channels or _default_channels(shape[2]))
    if len(chans) != shape[2]:
        raise ConvertError(f"{len(chans)} channel names {chans} for {shape[2]}-channel images")
    # Shards: rows of each split, shuffled by seed, cut into samples_per_shard chunks; one job per shard.
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for old in list(out.glob("*.tar")) + list(out.glob("*.idx")):
        old.unlink()
    splits = sorted({r["split"] for r in rows})
    jobs = []
    for s_i, split in enumerate(splits):
        rs = [r for r in rows if r["split"] == split]
        if shuffle:
            rs = [rs[i] for i in np.random.default_rng([seed, s_i]).permutation(len(rs))]
        for j, lo in enumerate(range(0, len(rs), samples_per_shard)):
            jobs.append({"out": str(out), "split": split, "shard_no": j, "rows": rs[lo:lo + samples_per_shard],
                         "encoding": encoding, "channels": chans, "shape": shape, "policy": bad_sample_policy,
                         "csv": str(csv_path)})
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as ex:
            results = list(ex.map(_convert_shard, jobs))
    else:
        results = [_convert_shard(j) for j in jobs]
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    counts: dict[str, dict[str, Counter]] = {s: {g: Counter() for g in LABEL_GROUPS} for s in splits}
    skipped = [x for res in results for x in res["skipped"]]
    for res in results:
        if res["record"] is not None:
            records[res["split"]].append(res["record"])
        for g in LABEL_GROUPS:
            counts[res["split"]][g].update(res["labels"][g])
    for x in skipped:
        log.warning("skipped bad sample: %s", x["message"])
    label_counts = {s: {g: dict(sorted(c.items())) for g, c in v.items()} for s, v in counts.items()}
    source = {"kind": "convert", "layout": layout, "csv": str(csv_path), "image_root": str(root), "seed": seed,
              "shuffle": shuffle, "skipped": len(skipped),
              "skipped_by_reason": dict(Counter(x["reason"] for x in skipped))}
    records = {s: v for s, v in records.items() if v}
    manifest = build_manifest(records, vocabs, shape, chans, encoding, label_counts, source)
    write_manifest(out, manifest)
    return {"out": str(out), "layout": layout, "image_shape": list(shape), "encoding": encoding,
            "splits": {s: v["count"] for s, v in manifest["splits"].items()},
            "shards": {s: len(v["shards"]) for s, v in manifest["splits"].items()},
            "label_counts": label_counts, "skipped": len(skipped),
            "skipped_by_reason": source["skipped_by_reason"], "skipped_samples": [x["message"] for x in skipped[:100]],
            "seconds": round(time.perf_counter() - t0, 3)}
