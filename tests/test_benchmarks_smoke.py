"""Every benchmark script runs in --smoke mode (tiny CPU shapes, Triton under the interpreter) and writes
well-formed result rows, so the scripts cannot rot between GPU runs."""
import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
COMMON = {"device", "commit", "date"}


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_smoke_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script,impl_key,impls", [
    ("bench_modrmsnorm", "impl", {"eager", "compile", "triton"}),
    ("bench_gated_residual", "impl", {"eager", "compile", "triton"}),
    ("bench_skip_merge", "impl", {"eager", "compile", "triton", "triton-gemm"}),
    ("bench_train_step", "config", {"eager", "compile", "compile+kernels"}),
])
def test_benchmark_smoke(script, impl_key, impls, tmp_path):
    mod = load(script)
    rows = mod.main(["--smoke", "--out", str(tmp_path)])
    assert {r[impl_key] for r in rows} == impls
    files = list(tmp_path.glob("*.csv"))
    assert len(files) == 1 and files[0].stem == mod.NAME
    with files[0].open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    for r in written:
        assert COMMON <= r.keys() and all(r[k] for k in COMMON)
        assert r["smoke"] == "True"
        if impl_key == "impl":
            assert r["mode"] in ("forward", "backward", "both") and float(r["ms"]) > 0 and float(r["gbps"]) > 0
        else:
            assert r["status"] == "ok" and float(r["images_per_s"]) > 0 and float(r["mfu"]) > 0
    # A later run appends below (a new column widens the file; old rows keep their values).
    mod.common.append_rows(mod.NAME, [{**rows[0], "extra_col": 1}], tmp_path)
    with files[0].open() as f:
        again = list(csv.DictReader(f))
    assert len(again) == len(rows) + 1 and again[-1]["extra_col"] == "1" and again[0]["extra_col"] == ""


def test_train_flop_count_is_the_architecture_figure():
    """MiT-XL/2 at 96x96x6: ~8.7 TFLOP per training image (ARCHITECTURE.md section 6), from the shape."""
    from phenoflow.config import resolve
    from phenoflow.model.flops import train_flops_per_image
    from phenoflow.model.mit import model_shape

    for size in ("XL", "XL-h64"):
        flops = train_flops_per_image(model_shape(resolve("mit-xl2-rxrx1", [f"model.size={size}"])))
        assert 8.6e12 < flops < 8.8e12, (size, flops)
