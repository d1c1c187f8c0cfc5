"""benchmarks/bench_loader.py --smoke runs and reports every backend x encoding x layout with its same-run ratio."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"


def test_bench_loader_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loader_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke", "--out", str(tmp_path), "--backends", "webdataset", "npy_files"])
    got = {(r["backend"], r["encoding"], r["layout"], r["checksums"]) for r in rows}
    default = {"npy_files": "-", "webdataset": "first_pass"}
    want = {(b, e, lay, default[b]) for b, e in [("npy_files", "npy"), ("webdataset", "raw"), ("webdataset", "png")]
            for lay in ("contiguous", "channels_last")}
    want |= {("webdataset", "raw", "channels_last", c) for c in ("always", "off")}  # the checksum cost variants
    assert got == want and len(rows) == 8
    for r in rows:
        assert r["samples"] > 0 and r["samples_per_s"] > 0 and r["speedup_vs_npy_files"] > 0
        assert r["commit"] and r["date"] and r["device"]
    text = (tmp_path / "loader.csv").read_text()
    assert text.startswith("bench,backend,encoding,layout,workers,checksums") and text.count("\n") == 9
