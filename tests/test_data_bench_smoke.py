"""benchmarks/bench_loader.py --smoke runs and reports every backend x encoding x layout with its same-run ratio."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"


def test_bench_loader_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loader_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke", "--out", str(tmp_path), "--backends", "webdataset", "npy_files"])
    got = {(r["backend"], r["encoding"], r["layout"]) for r in rows}
    assert got == {(b, e, lay) for b, e in [("npy_files", "npy"), ("webdataset", "raw"), ("webdataset", "png")]
                   for lay in ("contiguous", "channels_last")} and len(rows) == 6
    for r in rows:
        assert r["samples"] > 0 and r["samples_per_s"] > 0 and r["speedup_vs_npy_files"] > 0
        assert r["commit"] and r["date"] and r["device"]
    text = (tmp_path / "loader.csv").read_text()
    assert text.startswith("bench,backend,encoding,layout,workers") and text.count("\n") == 7
