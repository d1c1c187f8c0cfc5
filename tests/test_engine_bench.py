"""`phenoflow bench train` and benchmarks/bench_engines.py in smoke mode (tiny model, CPU, gloo)."""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
from pathlib import Path

import pytest

from phenoflow.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.size=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "data.image_size=16", "train.batch_size=4", "train.precision=fp32", "train.device=cpu"]


def test_bench_train_command_prints_a_table_and_a_trace(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "train", "--preset", "demo", *TINY, "--steps", "2", "--warmup", "1",
                   "--profile", str(tmp_path / "trace"), "--csv", str(tmp_path / "bench.csv")])
    assert rc == 0
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["engine", "world_size"])
    row = lines[header + 1].split()
    assert row[0] == "single" and row[1] == "1" and float(row[4]) > 0  # images/s
    assert list((tmp_path / "trace").glob("*.json")), "no profiler trace written"
    with (tmp_path / "bench.csv").open() as f:
        (written,) = list(csv.DictReader(f))
    assert written["engine"] == "single" and float(written["step_ms"]) > 0 and written["commit"]


@pytest.mark.slow
def test_bench_engines_smoke(tmp_path):
    pytest.importorskip("deepspeed")
    spec = importlib.util.spec_from_file_location("bench_engines_smoke", REPO / "benchmarks" / "bench_engines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke", "--out", str(tmp_path)])
    assert [r["engine"] for r in rows] == ["single", "ddp", "zero1", "zero2", "zero3", "fsdp2"]
    assert all(r["step_ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert all(r["world_size"] == (1 if r["engine"] == "single" else 2) for r in rows)
    with (tmp_path / "engines.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == 6 and all(r["device"] and r["commit"] and r["date"] for r in written)
    assert written[0]["step_vs_single"] == "1"
