"""Unseen-compound evaluation: the MiT paper's Table 2 layout (docs/molecules.md).

Rows (each a run and a guidance strength; any row may be left out):
    one-hot         the base run, w = 1 (its label rows; unseen compounds have untrained rows: not reported)
    unconditional   the base run, w = 0 (perturbation nulled: the null row; the unseen-compound baseline)
    fingerprint     an adaptor run with mol.representation=fingerprint, at w (default 1)
    embedding       an adaptor run with mol.representation=embedding, at w (default 1)
Columns: per split (`seen`: held-out images of trained compounds; `unseen`: compounds never trained on) the
pooled FD / KD (x1000) of each feature set, as phenoflow.eval.evaluate computes them (one generated image per real
image, same labels and doses), and `FD_pc`: the mean over compounds of the per-compound FD (evaluate's
per_perturbation, compounds with >= 2 images). A pooled distance rewards matching the mixture of the split's
compounds, which unconditional sampling does by construction when unseen compounds resemble the seen ones; the
per-compound mean asks each compound's images to look like that compound's.

Every cell is one call of phenoflow.eval.evaluate.evaluate (no second evaluator); its report folder is
out_dir/<row>/<split>/ and the table goes to out_dir/unseen.json and out_dir/unseen.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from phenoflow.config import Config, from_dict
from phenoflow.eval.report import METRIC_NAMES

ROWS = ("one-hot", "unconditional", "fingerprint", "embedding")
SPLITS = ("seen", "unseen")


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run exported with (export/model.json)."""
    meta = json.loads((Path(run_dir) / "export" / "model.json").read_text())
    return from_dict(meta.get("config", meta))


def _cell(results: dict, feats: list[str]) -> dict[str, float]:
    row = results["sweep"][0]
    out = dict(row["metrics"])
    out["nfe"] = row["nfe"]
    per = row.get("per_perturbation") or {}
    for f in feats:
        fd = METRIC_NAMES[f][0]
        vals = [v[fd] for v in per.values() if fd in v]
        if vals:
            out[f"{fd}_pc"] = float(np.mean(vals))
    out["n_compounds"] = len(per)
    return out


def evaluate_unseen(runs: dict[str, str | Path | tuple[str | Path, float]], out_dir: str | Path,
                    data_dir: str | Path | None = None, splits: tuple[str, ...] = SPLITS,
                    features: list[str] | None = None, max_images: int = 0, solver: str | None = None,
                    steps: int | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The table. runs: {"base": run_dir, "fingerprint": run_dir or (run_dir, w), "embedding": ...}; "base"
    gives the one-hot (w=1) and unconditional (w=0) rows."""
    from phenoflow.eval.evaluate import evaluate

    out = Path(out_dir)
    plan: list[tuple[str, Path, float]] = []
    for name, spec in runs.items():
        run, w = (spec if isinstance(spec, tuple) else (spec, None))
        if name == "base":
            plan += [("one-hot", Path(run), 1.0), ("unconditional", Path(run), 0.0)]
        elif name in ROWS:
            plan.append((name, Path(run), 1.0 if w is None else float(w)))
        else:
            raise ValueError(f"unknown row {name!r}: give base, fingerprint or embedding (or one-hot/unconditional)")
    table: dict[str, dict[str, Any]] = {}
    for row, run, w in plan:
        cfg = run_config(run)
        for split in splits:
            if row == "one-hot" and split == "unseen":
                table.setdefault(row, {})[split] = None  # untrained label rows: not a prediction
                continue
            ev = replace(cfg.eval, split=split, guidance=[w], per_perturbation=True,
                         features=list(features or cfg.eval.features), max_images=max_images or cfg.eval.max_images,
                         **({"solver": solver} if solver else {}), **({"steps": steps} if steps else {}))
            c = replace(cfg, eval=ev)
            rep = evaluate(c, run, report_dir=out / row / split, seed=seed, progress=progress, data_dir=data_dir)
            results = json.loads((rep / "metrics.json").read_text())
            table.setdefault(row, {})[split] = {"run": str(run), "w": w, **_cell(results, ev.features)}
    result = {"rows": table, "splits": list(splits), "features": list(features or []),
              "note": "FD/KD pooled over the split; *_pc: mean per-compound FD; KD x1000"}
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "unseen.json", json.dumps(result, indent=2) + "\n")
    _write(out / "unseen.md", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    rows, splits = result["rows"], result["splits"]
    metrics: list[str] = []
    for cells in rows.values():
        for cell in cells.values():
            for k in (cell or {}):
                if (k.startswith(("FD", "KD", "FID", "KID")) and not k.endswith("_std") and k not in metrics):
                    metrics.append(k)
    head = "| conditioning | " + " | ".join(f"{s} {m}" for s in splits for m in metrics) + " |"
    lines = ["# Unseen-compound evaluation (MiT Table 2 layout)", "", head,
             "|---|" + "---|" * (len(splits) * len(metrics))]
    for row in ROWS:
        if row not in rows:
            continue
        vals = []
        for s in splits:
            cell = rows[row].get(s)
            vals += [("-" if not cell or m not in cell else f"{cell[m]:.3g}") for m in metrics]
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    lines += ["", ("FD/KD: pooled over the split (KD x1000); *_pc: mean over compounds of the per-compound FD. "
                   "one-hot on unseen compounds: untrained rows, not reported."), ""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m phenoflow.eval.unseen --base RUN [--fingerprint RUN[:w]] [--embedding RUN[:w]] --out DIR`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m phenoflow.eval.unseen")
    ap.add_argument("--base", help="the one-hot run (one-hot and unconditional rows)")
    ap.add_argument("--fingerprint", help="the fingerprint adaptor run, optionally RUN:w")
    ap.add_argument("--embedding", help="the embedding-file adaptor run, optionally RUN:w")
    ap.add_argument("--data", default=None, help="shard folder (default: the runs' data section)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--splits", default="seen,unseen")
    ap.add_argument("--max-images", type=int, default=0)
    a = ap.parse_args(argv)
    runs: dict[str, Any] = {}
    for name in ("base", "fingerprint", "embedding"):
        v = getattr(a, name)
        if v:
            run, _, w = v.rpartition(":") if ":" in v and v.rsplit(":", 1)[1].replace(".", "").isdigit() else (v, "", "")
            runs[name] = (run, float(w)) if w else run
    evaluate_unseen(runs, a.out, data_dir=a.data, splits=tuple(a.splits.split(",")), max_images=a.max_images,
                    progress=True)
    print((Path(a.out) / "unseen.md").read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
