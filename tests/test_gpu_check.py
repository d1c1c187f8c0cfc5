"""The one GPU command (benchmarks/gpu_check.py) runs every part in --smoke mode on the CPU through the same
code path a GPU run takes, and its summary has every headline row (CPU rows say "cpu"); the bundle install
step installs, without an index, only the wheels whose distribution is missing."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_bundle, gpu_check
from benchmarks.gpu_summary import FIGURES


def test_smoke_run_has_every_summary_row(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
                           "--commit", "testsha"], cwd=REPO, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "results" / "gpu_check.csv").open() as f:
        parts = {r["part"]: r for r in csv.DictReader(f)}
    assert set(parts) == {p.name for p in gpu_check.PARTS}
    assert all(r["status"] == "ok" for r in parts.values()), {k: r["reason"] for k, r in parts.items()}
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["figure"] for r in table] == [fig for fig, _ in FIGURES]
    assert not [r for r in table if r["verdict"] == "missing" or r["value"].startswith("missing")], table
    targets = [r for r in table if r["target"].startswith(">=") or r["figure"].startswith("gpu tests")]
    assert len(targets) >= 12 and all(r["verdict"] == "cpu" for r in targets), targets
    # The summary is the last thing printed, and every row carries commit, torch and Triton versions.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| loader vs one-.npy-per-crop |")
    for f in (out / "results").glob("*.csv"):
        with f.open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(r["commit"] == "testsha" and r["torch"] and "date" in r for r in rows), f.name
    assert (out / "gpu_tests.xml").is_file() and (out / "logs" / "train.log").is_file()


def test_a_failing_part_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "gpu"

    def commands(part, args, results):
        if part == "env":
            return [[sys.executable, "-c", "raise SystemExit('no GPU here: env part broken on purpose')"]]
        if part == "ops":
            return [[sys.executable, "-c", "import time; time.sleep(30)"]]
        return [[sys.executable, "-c", "pass"]]

    monkeypatch.setattr(gpu_check, "commands", commands)
    monkeypatch.setattr(gpu_check, "PARTS", [gpu_check.Part("env", 5, 5), gpu_check.Part("ops", 1, 1),
                                              gpu_check.Part("loader", 5, 5)])
    table = gpu_check.main(["--smoke", "--out", str(out), "--commit", "x"]) or gpu_check._read(out / "summary.csv")
    with (out / "results" / "gpu_check.csv").open() as f:
        parts = {r["part"]: r for r in csv.DictReader(f)}
    assert parts["env"]["status"] == "failed" and "broken on purpose" in parts["env"]["reason"]
    assert parts["ops"]["status"] == "timeout" and parts["loader"]["status"] == "ok"
    assert any(r["value"] == "missing: env failed" for r in table)


def _wheel(src: Path, name: str, dest: Path) -> Path:
    pkg = src / name
    (pkg / name.replace("-", "_")).mkdir(parents=True)
    (pkg / name.replace("-", "_") / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "setup.py").write_text(textwrap.dedent(f"""
        from setuptools import setup
        setup(name={name!r}, version="0.0.1", packages=[{name.replace('-', '_')!r}])
    """))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(dest), str(pkg)], check=True, capture_output=True)
    return next(dest.glob(f"{name.replace('-', '_')}-*.whl"))


def test_bundle_installs_only_what_is_missing(tmp_path):
    wheels = tmp_path / "wheels"
    probe = _wheel(tmp_path / "src", "pf-bundle-probe", wheels)
    shadow = _wheel(tmp_path / "src", "tqdm", wheels)  # a distribution the environment already has
    assert gpu_bundle.wheel_distribution(probe) == "pf-bundle-probe"
    done = gpu_bundle.install(wheels, tmp_path / "site")
    assert done == {"installed": ["pf-bundle-probe"], "present": ["tqdm"]}
    assert not (tmp_path / "site" / "tqdm").exists(), f"{shadow.name} shadowed the installed tqdm"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", "import pf_bundle_probe; print(pf_bundle_probe.VALUE)"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "42"
    with pytest.raises(FileNotFoundError, match="make gpu-bundle"):
        gpu_bundle.install(tmp_path / "empty", tmp_path / "site2")


def test_every_gpu_marked_test_file_is_run():
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                    if re.search(r"mark\.gpu|pytestmark\s*=.*gpu", p.read_text()))
    assert marked and set(marked) <= set(gpu_check.GPU_TEST_FILES), set(marked) - set(gpu_check.GPU_TEST_FILES)
