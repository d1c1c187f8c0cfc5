"""Every GPU number in one command: checks and benchmarks for one bare H100/H200, inside about 8 minutes.

    python benchmarks/gpu_check.py --out OUT [--bundle .gpu-bundle] [--sweep-tiles] [--smoke]

Parts, in order, each a subprocess with its own time budget (seconds on one H100/H200; --smoke: tiny shapes
on the CPU with Triton under its interpreter, through the same code path, as the test suite runs it):

    env       GPU, memory, driver, torch / Triton / CUDA versions; measured copy bandwidth and bf16 GEMM rate
    tests     the GPU-marked tests (kernels fwd+bwd at real and odd shapes, the bf16 rule, dropout statistics,
              the whole MiT on both kernel paths, attention with head dim 72 and 64, feature networks)
    ops       each fused op vs eager vs torch.compile: ms, GB/s, fraction of copy bandwidth (--sweep-tiles: tiles)
    train     MiT-XL/2 96x96x6, micro-batch 16, bf16 autocast: eager, compile, compile+kernels; XL-h64 and
              activation checkpointing with the fastest of those; images/s, MFU, peak memory
    engines   DDP vs DeepSpeed ZeRO-2 on one GPU (step-time ratio; skipped with the reason without DeepSpeed)
    sampling  dopri5 (rtol = atol = 1e-5) vs Heun, NFE and images/s on an XL-shaped MiT; Inception-v3 and
              DINOv2 ViT-L/14 feature extraction images/s (random weights: speed does not depend on them)
    loader    raw shards, 4 and 8 workers, samples/s against the one-.npy-per-crop baseline

Everything lands in OUT: results/<bench>.csv (rows with device, commit, date, torch and Triton versions),
logs/<part>.log, gpu_tests.xml, summary.md and summary.csv (one row per headline figure with its target). A
part that fails or runs past its budget is recorded with the reason (results/gpu_check.csv) and the run goes
on; the last thing printed is the summary table. `--bundle` installs the wheels the machine lacks
(benchmarks/gpu_bundle.py; `make gpu-bundle` fetches them) into OUT/site; phenoflow runs from this source
tree. Afterwards, on the development machine: `python benchmarks/gpu_check.py --merge OUT` appends the rows to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common
from benchmarks.gpu_summary import summarize, write_summary

# The test files holding GPU-marked tests (tests/test_gpu_check.py checks that none is missing).
GPU_TEST_FILES = ["tests/test_kernel_modulated_rmsnorm.py", "tests/test_kernel_gated_residual.py",
                  "tests/test_kernel_skip_merge.py", "tests/test_kernel_model.py", "tests/test_kernel_compile.py",
                  "tests/test_attention.py", "tests/test_eval_networks.py", "tests/test_data_dali.py"]


@dataclass
class Part:
    name: str
    budget_s: float  # on one H100/H200
    smoke_budget_s: float  # on a 2-core CPU


# Budgets sum to 470 s: with start-up and the bundle install the run stays inside 8 minutes on one GPU.
PARTS = [Part("env", 20, 60), Part("tests", 70, 240), Part("ops", 60, 240), Part("train", 180, 300),
         Part("engines", 50, 300), Part("sampling", 50, 240), Part("loader", 40, 240)]


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args]


def commands(part: str, args, results: Path) -> list[list[str]]:
    """The subprocess commands of one part (train's later commands are chosen after its first: see run_train)."""
    smoke = ["--smoke"] if args.smoke else []
    out = ["--out", str(results)]
    if part == "env":
        return [_script("bench_env", *smoke, *out)]
    if part == "tests":
        return [[sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=",
                 f"--junitxml={args.out / 'gpu_tests.xml'}", *GPU_TEST_FILES]]
    if part == "ops":
        tiles = ["--sweep-tiles"] if args.sweep_tiles else []
        return [_script(f"bench_{op}", *smoke, *tiles, *out) for op in ("modrmsnorm", "gated_residual", "skip_merge")]
    if part == "engines":
        return [_script("bench_engines", *(["--smoke"] if args.smoke else ["--gpus", "1", "--steps", "6", "--warmup", "2"]),
                        "--engines", "ddp:0,deepspeed:2", *out)]
    if part == "sampling":
        # bf16 autocast and 8 images a solve: euler, heun and dopri5 at w = 1 and 2 fit the part's budget.
        extra = [] if args.smoke else ["--sample-batch", "8", "--feature-batch", "64", "--guidance", "1", "2", "--bf16"]
        return [_script("bench_eval", *smoke, "--parts", "sampling", "features", *extra, *out)]
    if part == "loader":
        extra = ["--workers", "0"] if args.smoke else ["--images", "8192", "--workers", "4", "8", "--rounds", "1"]
        return [_script("bench_loader", *smoke, "--backends", "webdataset", "npy_files", "--encodings", "raw",
                        "--checksums", "first_pass", "off", *extra, *out)]
    raise ValueError(part)


def _env(args, site: Path | None) -> dict:
    path = [str(REPO)] + ([str(site)] if site else []) + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PHENOFLOW_COMMIT": args.commit,
           "TORCH_EXTENSIONS_DIR": str(args.out / "torch_extensions"), "DS_BUILD_OPS": "0"}
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a machine with a GPU
    return env


def _run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[str, str]:
    """(status, reason) of one command: ok, failed (exit code and the last line of its output) or timeout.
    The command runs in its own process group, killed whole at the budget (torchrun's and the loader's workers
    included)."""
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", f"past its budget ({max(timeout, 0):.0f} s left when it started)"
    if rc == 0:
        return "ok", ""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return "failed", f"exit {rc}: {lines[-1][:300] if lines else ''}"


def _fastest_config(results: Path, since: str) -> str:
    rows = [r for r in _read(results / "train_step.csv") if r.get("date", "") >= since and r.get("status") == "ok"
            and r.get("size") in ("XL", "tiny") and r.get("activation_checkpointing", "False") == "False"]
    if not rows:
        return "compile+kernels"
    return max(rows, key=lambda r: float(r["images_per_s"]))["config"]


def run_train(args, results: Path, env: dict, log: Path, budget: float, since: str) -> tuple[str, str]:
    """XL with the three configs; then XL-h64 and activation checkpointing with the fastest of them."""
    smoke = ["--smoke"] if args.smoke else []
    timing = [] if args.smoke else ["--warmup", "2", "--iters", "5"]
    out = ["--out", str(results)]
    t0 = time.monotonic()
    status, reason = _run(_script("bench_train_step", *smoke, *timing, "--sizes", "XL", *out), env, log, budget)
    if status != "ok":
        return status, reason
    best = _fastest_config(results, since)
    for extra in (["--sizes", "XL-h64"], ["--sizes", "XL", "--activation-checkpointing"]):
        left = budget - (time.monotonic() - t0)
        status, reason = _run(_script("bench_train_step", *smoke, *timing, *extra, "--configs", best, *out),
                              env, log, left)
        if status != "ok":
            return status, reason
    return "ok", f"fastest config: {best}"


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def install_bundle(bundle: Path, site: Path) -> tuple[str, str]:
    from benchmarks.gpu_bundle import install

    wheels = bundle / "wheels"
    if not wheels.is_dir():
        return "skipped", f"no bundle at {wheels} (make gpu-bundle on a networked machine)"
    try:
        done = install(wheels, site)
    except (OSError, subprocess.CalledProcessError) as e:
        return "failed", str(e)[:300]
    return "ok", f"installed {', '.join(done['installed']) or 'nothing'}; present {len(done['present'])}"


def run(args) -> list[dict]:
    args.out.mkdir(parents=True, exist_ok=True)
    results, logs = args.out / "results", args.out / "logs"
    results.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    since = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    os.environ["PHENOFLOW_COMMIT"] = args.commit
    status_rows = []

    def record(part, status, reason, seconds, budget):
        print(f"[gpu_check] {part:9s} {status:8s} {seconds:6.1f}s / {budget:.0f}s  {reason}", flush=True)
        status_rows.append({"bench": "gpu_check", "part": part, "status": status, "seconds": seconds,
                            "budget_s": budget, "reason": reason, "smoke": args.smoke})

    site = None
    if args.bundle:
        t = time.monotonic()
        status, reason = install_bundle(Path(args.bundle), args.out / "site")
        site = args.out / "site" if status == "ok" else None
        record("bundle", status, reason, time.monotonic() - t, 60)
    env = _env(args, site)
    for part in PARTS:
        if args.parts and part.name not in args.parts:
            continue
        budget = (part.smoke_budget_s if args.smoke else part.budget_s) * args.budget_scale
        log = logs / f"{part.name}.log"
        t = time.monotonic()
        if part.name == "train":
            status, reason = run_train(args, results, env, log, budget, since)
        else:
            status, reason = "ok", ""
            for cmd in commands(part.name, args, results):
                status, reason = _run(cmd, env, log, budget - (time.monotonic() - t))
                if status != "ok":
                    break
        record(part.name, status, reason, time.monotonic() - t, budget)
    import torch

    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    common.append_rows("gpu_check", [{**r, **common.stamp(dev)} for r in status_rows], results)
    summary = summarize(results, args.out / "gpu_tests.xml", since, status_rows, gpu=dev.type == "cuda")
    print(write_summary(summary, args.out))
    return summary


def merge(out: Path, dest: Path) -> None:
    """Append the rows of a finished run (OUT/results/*.csv) to the project's result files."""
    for f in sorted((out / "results").glob("*.csv")):
        rows = _read(f)
        common.append_rows(f.stem, rows, dest)
        print(f"{f.stem}: {len(rows)} rows -> {dest / f.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (results/, logs/, summary.md)")
    p.add_argument("--smoke", action="store_true", help="every part at tiny shapes on the CPU (the test suite)")
    p.add_argument("--bundle", default="", help="folder with wheels/ (make gpu-bundle) to install what is missing")
    p.add_argument("--sweep-tiles", action="store_true", help="ops: also time the Triton tile settings")
    p.add_argument("--parts", nargs="+", default=[], choices=[q.name for q in PARTS], help="only these parts")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    p.add_argument("--commit", default="", help="commit of the tree (default: git rev-parse, where .git exists)")
    p.add_argument("--merge", type=Path, default=None, metavar="OUT",
                   help="append OUT/results/*.csv of a finished run to benchmarks/results/ and stop")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, common.RESULTS)
        return 0
    if args.out is None:
        p.error("--out is required")
    args.commit = args.commit or common.commit()
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
