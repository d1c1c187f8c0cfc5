"""benchmarks/bench_eval.py --smoke runs and yields rows for every part (no file written without --out)."""
import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_eval.py"


def test_bench_eval_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_eval_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--smoke", "--out", str(tmp_path)])
    assert torch.is_grad_enabled()  # the benchmark leaves global state as it found it
    kinds = {(r["kind"], r["name"]) for r in rows}
    assert {("features", "morphology"), ("features", "inception"), ("features", "dinov2-small"),
            ("metric", "frechet_distance")} <= kinds
    sampling = [r for r in rows if r["kind"] == "sampling"]
    assert {(r["solver"], r["w"]) for r in sampling} == {(s, w) for s in ("euler", "heun", "dopri5") for w in (1, 2)}
    for r in sampling:
        assert r["forwards"] == r["nfe"] * (2 if r["w"] == 2 else 1) and r["images_per_s"] > 0
    assert all(r["commit"] and r["date"] and r["device"] for r in rows)
    assert (tmp_path / "eval.csv").read_text().count("\n") == len(rows) + 1
