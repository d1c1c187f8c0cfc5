"""benchmarks/bench_expression.py runs in --smoke mode (tiny shapes, all three parts: training throughput, shard
loader against backed h5ad, peak training memory from a converted shard folder) and writes well-formed rows."""
import csv
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_expression.py"


def test_expression_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_smoke_expression", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke", "--out", str(tmp_path)])
    parts = {r["part"] for r in rows}
    assert parts == {"train", "loader", "memory"}
    assert {r["model"] for r in rows if r["part"] == "train"} == {"unet_ref", "unet_cpu", "mlp"}
    assert {r["backend"] for r in rows if r["part"] == "loader"} == {"shards", "h5ad_backed"}
    with (tmp_path / "expression.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    for r in written:
        assert all(r[k] for k in ("device", "commit", "date", "torch")) and r["smoke"] == "True"
        if r["part"] == "train":
            assert float(r["cells_per_s"]) > 0 and float(r["params_m"]) > 0
        elif r["part"] == "loader":
            assert float(r["cells_per_s_per_worker"]) > 0 and float(r["speedup_vs_h5ad_backed"]) > 0
        else:
            assert float(r["peak_rss_mb"]) > 0 and float(r["file_mb"]) > 0 and int(r["cells"]) == 1024
