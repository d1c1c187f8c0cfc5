"""Every Triton kernel compiles for sm_90 (H100/H200) at the launchers' real tile sizes, without spilling.

Runs without a GPU: Triton lowers the kernels to a cubin with the ptxas bundled in its wheel
(phenoflow.kernels.aot_check), in a subprocess because this test process runs Triton's interpreter. This
covers what the interpreter cannot: code that only fails to compile for a real GPU, and register spills.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="triton wheel without the bundled ptxas")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, "-m", "phenoflow.kernels.aot_check", "--arch", "90", "--D", "1152"],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len(lines) == 13 and all(ln.startswith("ok") for ln in lines), r.stdout
