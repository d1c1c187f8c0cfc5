"""The headline table of a gpu_check run: one row per figure the project claims, with its target.

Rows are read back from the run's result files (only rows dated from the run's start), so the table shows
what was measured, never a number typed in. A figure whose part failed or was skipped says so in `value`
("missing: <part> <status>"). Targets (benchmarks/README.md): fused ops >= 80% of copy bandwidth, >= 2x eager,
>= 1.2x torch.compile; the training step >= 50% MFU and >= 25% less peak memory than eager; the loader >= 5x the
one-.npy-per-crop baseline; GPU tests: no failure. Figures without a target are reported for reading ("-").
"""
from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from pathlib import Path

# (figure, part that produces it) in the order printed; tests/test_gpu_check.py asserts every one is present.
FIGURES = [
    ("device", "env"), ("copy bandwidth GB/s", "env"), ("bf16 GEMM TFLOP/s", "env"),
    ("gpu tests passed / failed / skipped", "tests"),
    ("modrmsnorm: fraction of copy bandwidth", "ops"), ("modrmsnorm: speedup vs eager", "ops"),
    ("modrmsnorm: speedup vs compile", "ops"),
    ("gated_residual: fraction of copy bandwidth", "ops"), ("gated_residual: speedup vs eager", "ops"),
    ("gated_residual: speedup vs compile", "ops"),
    ("skip_merge: fraction of copy bandwidth", "ops"), ("skip_merge: speedup vs eager", "ops"),
    ("skip_merge: speedup vs compile", "ops"),
    ("train XL/2 fastest config images/s", "train"), ("train XL/2 MFU (datasheet peak)", "train"),
    ("train XL/2 MFU (measured GEMM rate)", "train"), ("train XL/2 peak memory vs eager", "train"),
    ("train XL-h64 vs XL/2 images/s", "train"), ("train activation checkpointing: memory / speed", "train"),
    ("ZeRO-2 / DDP step time", "engines"),
    ("sampling dopri5 NFE, images/s", "sampling"), ("sampling heun images/s", "sampling"),
    ("features inception images/s", "sampling"), ("features dinov2 images/s", "sampling"),
    ("loader raw samples/s (most workers)", "loader"), ("loader vs one-.npy-per-crop", "loader"),
]


def _rows(results: Path, name: str, since: str) -> list[dict]:
    path = results / f"{name}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("date", "") >= since]


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _verdict(value: float, target: float, gpu: bool) -> str:
    """met / NOT met against a GPU target; "cpu" for a CPU (smoke) row, whose numbers say nothing of it."""
    if not gpu:
        return "cpu"
    if math.isnan(value):
        return "missing"
    return "met" if value >= target else "NOT met"


def summarize(results: Path, junit: Path, since: str, status_rows: list[dict], gpu: bool) -> list[dict]:
    status = {r["part"]: r["status"] for r in status_rows}
    out: dict[str, dict] = {}

    def put(figure, value, target=None, verdict="-"):
        out[figure] = {"figure": figure, "value": value, "target": target if target is not None else "-",
                       "verdict": verdict}

    env = _rows(results, "env", since)
    if env:
        e = env[-1]
        put("device", f"{e['device']}, torch {e['torch']}, triton {e['triton']}, cuda {e['cuda'] or '-'}")
        put("copy bandwidth GB/s", f"{_f(e['copy_gbps']):.0f}", "reference: H100 ~3000, H200 ~4300")
        put("bf16 GEMM TFLOP/s", f"{_f(e['gemm_tflops']):.1f} ({e['gemm_dtype']})",
            f"reference: ~790 measured, {_f(e['datasheet_bf16_tflops']):.0f} datasheet")
    gemm = _f(env[-1]["gemm_tflops"]) * 1e12 if env else float("nan")

    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        ran = n - skip
        verdict = "NOT met" if fail + err else ("met" if ran else ("cpu" if not gpu else "missing"))
        put("gpu tests passed / failed / skipped", f"{ran - fail - err} / {fail + err} / {skip}", "0 failed", verdict)

    for op in ("modrmsnorm", "gated_residual", "skip_merge"):
        rows = [r for r in _rows(results, op, since) if r.get("impl") == "triton" and r.get("mode") == "both"
                and r.get("p", "0.1") in ("0.1", "")]
        if rows:
            r = rows[-1]
            frac, ve, vc = _f(r["frac_copy_bw"]), _f(r["speedup_vs_eager"]), _f(r["speedup_vs_compile"])
            put(f"{op}: fraction of copy bandwidth", f"{frac:.2f}", ">= 0.80", _verdict(frac, 0.8, gpu))
            put(f"{op}: speedup vs eager", f"{ve:.2f}x", ">= 2x", _verdict(ve, 2.0, gpu))
            put(f"{op}: speedup vs compile", f"{vc:.2f}x", ">= 1.2x", _verdict(vc, 1.2, gpu))

    train = [r for r in _rows(results, "train_step", since) if r.get("status") == "ok"]
    base = [r for r in train if r.get("size") in ("XL", "tiny") and r.get("activation_checkpointing") != "True"]
    if base:
        best = max(base, key=lambda r: _f(r["images_per_s"]))
        eager = next((r for r in base if r["config"] == "eager"), None)
        ips = _f(best["images_per_s"])
        put("train XL/2 fastest config images/s", f"{ips:.1f} ({best['config']}, batch {best['batch']})")
        put("train XL/2 MFU (datasheet peak)", f"{100 * _f(best['mfu']):.1f}%", ">= 50%", _verdict(_f(best["mfu"]), 0.5, gpu))
        flops = _f(best["train_tflop_per_image"]) * 1e12
        put("train XL/2 MFU (measured GEMM rate)", f"{100 * ips * flops / gemm:.1f}%")
        if eager:
            cut = 1 - _f(best["peak_mem_gb"]) / _f(eager["peak_mem_gb"])
            put("train XL/2 peak memory vs eager", f"{100 * cut:+.1f}% less ({best['config']})", ">= 25% less",
                _verdict(cut, 0.25, gpu))
        h64 = [r for r in train if r.get("size") == "XL-h64"]
        if h64:
            put("train XL-h64 vs XL/2 images/s", f"{_f(h64[-1]['images_per_s']) / ips:.2f}x ({h64[-1]['config']})")
        elif best.get("size") == "tiny":  # smoke: the same command with the tiny model
            put("train XL-h64 vs XL/2 images/s", "n/a on cpu (tiny model only)")
        ac = [r for r in train if r.get("activation_checkpointing") == "True"]
        if ac:
            a = ac[-1]
            same = next((r for r in base if r["config"] == a["config"]), best)
            mem = 1 - _f(a["peak_mem_gb"]) / _f(same["peak_mem_gb"])
            put("train activation checkpointing: memory / speed",
                f"{100 * mem:+.1f}% less memory, {_f(a['images_per_s']) / _f(same['images_per_s']):.2f}x speed")

    eng = _rows(results, "engines", since)
    ddp = [r for r in eng if r.get("engine") == "ddp"]
    z2 = [r for r in eng if r.get("engine") == "zero2"]
    if ddp and z2:
        put("ZeRO-2 / DDP step time", f"{_f(z2[-1]['step_ms']) / _f(ddp[-1]['step_ms']):.2f}")

    ev = _rows(results, "eval", since)
    samp = [r for r in ev if r.get("kind") == "sampling"]
    for solver, fig in (("dopri5", "sampling dopri5 NFE, images/s"), ("heun", "sampling heun images/s")):
        rows = [r for r in samp if r.get("solver") == solver]
        if rows:
            r = min(rows, key=lambda r: _f(r.get("w")))
            put(fig, (f"NFE {r['nfe']}, " if solver == "dopri5" else "") + f"{_f(r['images_per_s']):.2f} (w = {r['w']})")
    for net in ("inception", "dinov2"):
        rows = [r for r in ev if r.get("kind") == "features" and r.get("name", "").startswith(net)]
        if rows:
            put(f"features {net} images/s", f"{_f(rows[-1]['images_per_s']):.0f} ({rows[-1]['name']})")

    load = _rows(results, "loader", since)
    raw = [r for r in load if r.get("backend") == "webdataset" and r.get("encoding") == "raw"
           and r.get("layout") == "channels_last" and r.get("checksums") == "off"]
    if raw:
        top = max(raw, key=lambda r: int(r["workers"]))
        put("loader raw samples/s (most workers)", f"{_f(top['samples_per_s']):.0f} ({top['workers']} workers)")
        sp = _f(top["speedup_vs_npy_files"])
        put("loader vs one-.npy-per-crop", f"{sp:.2f}x", ">= 5x", _verdict(sp, 5.0, gpu))

    table = []
    for figure, part in FIGURES:
        if figure in out:
            table.append(out[figure])
        else:
            table.append({"figure": figure, "value": f"missing: {part} {status.get(part, 'not run')}",
                          "target": "-", "verdict": "missing"})
    return table


def write_summary(table: list[dict], out: Path) -> str:
    """summary.csv and summary.md in `out`; returns the markdown table."""
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["figure", "value", "target", "verdict"])
        w.writeheader()
        w.writerows(table)
    lines = ["| figure | value | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['figure']} | {r['value']} | {r['target']} | {r['verdict']} |" for r in table]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text
