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
shape differing from the first image's, or a missing or unreadable file are bad samples: by default every one is
found (the conversion reads all rows) and then reported in one ConvertError naming CSV, row, column, value and
reason; with bad_sample_policy="skip" they are counted per reason, logged and listed in the summary.
CSV problems (layouts.py: ragged rows, missing values, bad doses, image paths outside the image root, duplicate
or over-long keys, labels outside `vocab_from`) are always errors, all reported at once before any image is read.
Conversion runs shard by shard in `workers` processes (progress on stderr: phenoflow.progress) and returns counts
per split and label; the full per-label counts also go to `out`/label_counts.csv. A conversion that fails (bad
rows, a worker that dies or raises) removes what it wrote (shards, their temporary files), so a new `out` is left
without a manifest and without partial files. `out` must be empty or new unless `overwrite`; a previous conversion
there is replaced only once the new one is complete, leaving no orphan files (convert_out.py).
Per-sample metadata (the json member) holds, besides the labels, the source key, path, perturbation name and, for
the cellflux layout, the mechanism of action (`moa`, from ANNOT), `plate` (PLATE) and `batch` (BATCH).
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from .convert_out import (
    LABEL_COUNTS,
    SKIPPED_ROWS,
    abandon_output,
    check_out,
    finish_output,
    start_output,
    write_label_counts,
    write_skipped_rows,
)
from .errors import ConvertError
from .layouts import (  # noqa: F401  cellflux_candidates, CONTROL_NAMES: re-exported (public names of this module)
    CONTROL_NAMES,
    LAYOUTS,
    cellflux_candidates,
    conversion_failed,
    find_image_root,
    problem,
    problem_line,
    read_rows,
)
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
MAX_KEY = 90  # shards.py's limit on sample keys


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def sanitize_key(key: str) -> str:
    """Sample keys may not contain '.', '/' or spaces (WebDataset splits members at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


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


def _sample_problem(job: dict[str, Any], r: dict[str, Any], e: BadSample) -> dict[str, Any]:
    p = problem(job["csv"], r["line"], r["path_column"], r["path_value"], f"{e} (key {r['source_key']})")
    p["reason_kind"] = e.reason
    return p


def _convert_shard(job: dict[str, Any]) -> dict[str, Any]:
    """One process: load the rows' images and write them as one shard. Bad samples are returned (policy skip:
    left out; policy error: every one is still found, but once one is, nothing more is written)."""
    bad: list[dict[str, Any]] = []
    with ShardWriter(job["out"], job["split"], samples_per_shard=len(job["rows"]) + 1, encoding=job["encoding"],
                     channels=job["channels"], start_shard=job["shard_no"]) as w:
        for r in job["rows"]:
            try:
                img = load_image(r["path"])
                if job["shape"] and tuple(img.shape) != tuple(job["shape"]):
                    raise BadSample("wrong shape", f"{r['path']}: shape {img.shape}, expected {tuple(job['shape'])}")
            except BadSample as e:
                bad.append(_sample_problem(job, r, e))
                if job["policy"] == "error":
                    w.abort()  # the conversion will fail: stop writing, keep checking
                continue
            if job["policy"] == "error" and bad:
                continue
            meta = {k: v for k, v in r.items() if k not in ("line", "path", "path_column", "path_value")}
            meta["source_path"] = str(r["path"])
            w.write(img, meta)
    recs = w.records if not (bad and job["policy"] == "error") else []
    return {"split": job["split"], "record": recs[0] if recs else None, "labels": w.label_counts, "bad": bad}


def _run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool = True) -> list[dict[str, Any]]:
    """Every job's result, in job order; progress (phenoflow.progress) advances by each finished shard's rows."""
    from phenoflow.progress import Progress

    with Progress(sum(len(j["rows"]) for j in jobs), "convert", "images", enabled=progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for j in jobs:
                results.append(_convert_shard(j))
                bar.update(len(j["rows"]))
            return results
        ex = ProcessPoolExecutor(min(workers, len(jobs)))
        try:
            futures = {ex.submit(_convert_shard, j): i for i, j in enumerate(jobs)}
            results: list[Any] = [None] * len(jobs)
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(len(jobs[futures[fut]]["rows"]))
        except BaseException:  # a job raised or a worker died: stop the rest before the caller cleans up
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
        return results


def _remove_outputs(out: Path, jobs: list[dict[str, Any]]) -> None:
    """Remove every file this conversion's jobs may have written: finished shards and temporary files (also those
    of a worker that was killed mid-write)."""
    for job in jobs:
        name = f"{job['split']}-{job['shard_no']:06d}"
        for p in [out / f"{name}.tar", out / f"{name}.idx", out / f"{name}.labels.json", *out.glob(f".{name}.*tmp*")]:
            p.unlink(missing_ok=True)
    for p in [*out.glob(".manifest.json.tmp*"), *out.glob(f".{LABEL_COUNTS}.tmp*"), out / LABEL_COUNTS,
              *out.glob(f".{SKIPPED_ROWS}.tmp*"), out / SKIPPED_ROWS]:
        p.unlink(missing_ok=True)


def _check_keys_and_labels(rows: list[dict[str, Any]], csv_path: Path, vocab_from: str | Path | None
                           ) -> tuple[list[dict[str, Any]], dict[str, Vocab] | None]:
    """Keys (sanitised) must be unique and at most MAX_KEY characters; with vocab_from, labels must be in its
    vocabularies. Returns the problems and the given vocabularies."""
    problems, seen = [], {}
    vocabs = manifest_vocabs(load_manifest(vocab_from)) if vocab_from else None
    for r in rows:
        r["key"] = sanitize_key(r["source_key"])
        col = "key" if r["path_column"] == "path" else r["path_column"]
        if not r["key"] or len(r["key"]) > MAX_KEY:
            problems.append(problem(csv_path, r["line"], col, r["source_key"],
                                    f"the sample key must have 1 to {MAX_KEY} characters"))
        elif r["key"] in seen:
            problems.append(problem(csv_path, r["line"], col, r["source_key"],
                                    f"gives the same sample key {r['key']!r} as row {seen[r['key']]}"))
        else:
            seen[r["key"]] = r["line"]
        for g in LABEL_GROUPS if vocabs else ():
            try:
                vocabs[g].index(str(r[g]))
            except ValueError as e:
                problems.append(problem(csv_path, r["line"], g, r[g], f"{e} (vocabularies of {vocab_from})"))
    return problems, vocabs


def convert(layout: str, csv_path: str | Path, out_dir: str | Path, *, image_root: str | Path | None = None,
            samples_per_shard: int = 1024, encoding: str = "raw", workers: int = 1,
            channels: str | Sequence[str] | None = None, bad_sample_policy: str = "error", seed: int = 0,
            shuffle: bool = True, image_size: int = 0, control_names: Sequence[str] = CONTROL_NAMES,
            vocab_from: str | Path | None = None, label_with_dose: bool = False,
            allow_outside_images: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert a layout to shards in out_dir; returns a summary with counts per split and label and skips.

    label_with_dose: a compound at each dose is its own perturbation class, as in the MiT code's BBBC021
    conditioning: non-control labels become "<name>_<dose:g>" (MiT layout: the perturbation_id_with_dose value
    when present); the name stays in `compound`, the dose in `dose`. Layouts without a dose keep the name.

    vocab_from: a shard folder whose vocabularies must be used (labels outside them are an error), e.g. to
    convert finetuning data with a pretraining run's vocabularies.

    allow_outside_images: read image paths of the CSV that leave `image_root` (absolute, or with `..`);
    refused by default.

    image_root: the folder the CSV's image paths are relative to; None: found (layouts.find_image_root: the CSV's
    folder, its imgs/, the parent's imgs/ as in the public IMPA/CellFlux layout, ...), or a ConvertError saying
    to pass --images.

    overwrite: `out_dir` may hold a previous conversion, which is replaced (convert_out.py); a non-empty folder is
    refused otherwise. progress: a progress bar / periodic lines on stderr (phenoflow.progress).
    """
    t0 = time.perf_counter()
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r} (known: {sorted(LAYOUTS)})")
    if bad_sample_policy not in ("error", "skip"):
        raise ConvertError(f"bad_sample_policy={bad_sample_policy!r} must be 'error' or 'skip'")
    csv_path, out = Path(csv_path), Path(out_dir)
    root, no_root = find_image_root(layout, csv_path, image_root)
    rows, problems = read_rows(layout, csv_path, root, control_names, label_with_dose, allow_outside_images)
    more, given = _check_keys_and_labels(rows, csv_path, vocab_from)
    if problems or more:
        raise conversion_failed(csv_path, problems + more, f"nothing was read or written (out: {out})")
    if no_root is not None:
        raise no_root
    check_out(out, overwrite)  # a non-empty folder needs --overwrite: refused before any image is read
    vocabs = given or {g: Vocab.build((r[g] for r in rows), g, first=CONTROL if g == "perturbation" else None)
                       for g in LABEL_GROUPS}
    # The expected shape: the first readable image (unreadable ones are reported with the others later).
    shape, unreadable = None, []
    for r in rows:
        try:
            shape = load_image(r["path"]).shape
            break
        except BadSample as e:
            unreadable.append(_sample_problem({"csv": str(csv_path)}, r, e))
    if shape is None:
        raise conversion_failed(csv_path, unreadable, f"no image is readable; nothing was written (out: {out})")
    if image_size and shape[:2] != (image_size, image_size):
        raise ConvertError(f"{csv_path}: images are {shape[0]}x{shape[1]} (row {rows[len(unreadable)]['line']}), "
                           f"expected --image-size {image_size}")
    chans = channels.split(",") if isinstance(channels, str) else list(channels or _default_channels(shape[2]))
    if len(chans) != shape[2]:
        raise ConvertError(f"{len(chans)} channel names {chans} for {shape[2]}-channel images")
    # Shards: rows of each split, shuffled by seed, cut into samples_per_shard chunks; one job per shard.
    dest = start_output(out, overwrite)  # out, or a staging folder when a previous conversion is replaced
    splits = sorted({r["split"] for r in rows})
    jobs = []
    for s_i, split in enumerate(splits):
        rs = [r for r in rows if r["split"] == split]
        if shuffle:
            rs = [rs[i] for i in np.random.default_rng([seed, s_i]).permutation(len(rs))]
        for j, lo in enumerate(range(0, len(rs), samples_per_shard)):
            jobs.append({"out": str(dest), "split": split, "shard_no": j, "rows": rs[lo:lo + samples_per_shard],
                         "encoding": encoding, "channels": chans, "shape": shape, "policy": bad_sample_policy,
                         "csv": str(csv_path)})
    try:
        results = _run_jobs(jobs, workers, progress)
    except BaseException:
        _remove_outputs(dest, jobs)
        abandon_output(dest, out)
        raise
    bad = [x for res in results for x in res["bad"]]
    if bad and bad_sample_policy == "error":
        _remove_outputs(dest, jobs)
        abandon_output(dest, out)
        raise conversion_failed(csv_path, bad, f"nothing was written (out: {out}); --bad-sample-policy skip "
                                "converts the good rows and lists these")
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    counts: dict[str, dict[str, Counter]] = {s: {g: Counter() for g in LABEL_GROUPS} for s in splits}
    skipped = [{"reason": x["reason_kind"], "message": problem_line(x)} for x in sorted(bad, key=lambda x: x["row"])]
    for res in results:
        if res["record"] is not None:
            records[res["split"]].append(res["record"])
        for g in LABEL_GROUPS:
            counts[res["split"]][g].update(res["labels"][g])
    for x in skipped[:10]:
        log.warning("skipped bad sample: %s", x["message"])
    if len(skipped) > 10:
        log.warning("... and %d more skipped bad samples (all in %s)", len(skipped) - 10, out / SKIPPED_ROWS)
    label_counts = {s: {g: dict(sorted(c.items())) for g, c in v.items()} for s, v in counts.items()}
    source = {"kind": "convert", "layout": layout, "csv": str(csv_path), "image_root": str(root), "seed": seed,
              "shuffle": shuffle, "skipped": len(skipped),
              "skipped_by_reason": dict(Counter(x["reason"] for x in skipped))}
    records = {s: v for s, v in records.items() if v}
    try:
        manifest = build_manifest(records, vocabs, shape, chans, encoding, label_counts, source)
        write_label_counts(dest, label_counts)
        if bad:
            write_skipped_rows(dest, bad)
        write_manifest(dest, manifest)
        finish_output(dest, out)
    except BaseException:
        _remove_outputs(dest, jobs)
        abandon_output(dest, out)
        raise
    counts_file = out / LABEL_COUNTS
    return {"out": str(out), "layout": layout, "csv": str(csv_path), "image_root": str(root),
            "image_shape": list(shape), "encoding": encoding, "label_counts_file": str(counts_file),
            "skipped_file": str(out / SKIPPED_ROWS) if bad else None,
            "splits": {s: v["count"] for s, v in manifest["splits"].items()},
            "shards": {s: len(v["shards"]) for s, v in manifest["splits"].items()},
            "label_counts": label_counts, "skipped": len(skipped),
            "skipped_by_reason": source["skipped_by_reason"], "skipped_samples": [x["message"] for x in skipped[:100]],
            "seconds": round(time.perf_counter() - t0, 3)}
