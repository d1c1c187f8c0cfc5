"""The wheels a bare GPU machine lacks, fetched on a networked machine and installed there without an index.

The project's GPU machines (one H100/H200, Python 3.12, PyTorch 2.11 with CUDA 13, Triton 3.6, torchvision,
timm, torchmetrics, torchdiffeq, numpy, scipy, pandas, h5py, safetensors, pytest, tqdm; no network) lack a few
packages phenoflow's checks use. `download()` (make gpu-bundle) puts CPython 3.12 manylinux x86-64 wheels of
them into one ignored folder (.gpu-bundle/wheels, about 8 MB; DeepSpeed ships only a source archive, so its
pure-Python wheel is built here with DS_BUILD_OPS=0); `install()` (benchmarks/gpu_check.py on the GPU machine)
installs, with `pip install --no-index --no-deps --target`, only the wheels whose distribution the machine
does not already have, so nothing the machine ships (torch above all) is shadowed. phenoflow itself runs from
the source tree (PYTHONPATH), on the machine's own torch.

DALI's CUDA wheel (about 500 MB) and flash-attn (no wheel) stay out: their rows are skipped with that reason.

    python benchmarks/gpu_bundle.py download [--dest .gpu-bundle]
    python benchmarks/gpu_bundle.py install --wheels .gpu-bundle/wheels --target /tmp/site
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Binary wheels for the GPU machine's interpreter and platform (versions pinned: a bundle is reproducible).
WHEELS = [
    "webdataset==1.0.2", "braceexpand==0.1.7", "POT==0.9.6.post1", "PyYAML==6.0.4",
    # DeepSpeed's run-time requirements that the GPU machine's stack does not bring.
    "hjson==3.1.0", "py-cpuinfo==9.0.0", "msgpack==1.2.4", "einops==0.8.2", "ninja==1.13.2", "psutil==7.2.2",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
]
DEEPSPEED = "deepspeed==0.19.8"
PLATFORM = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux_2_28_x86_64", "--python-version", "3.12", "--implementation", "cp",
            "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
MAX_BUNDLE_MB = 50


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def download(dest: Path) -> list[Path]:
    """Fetch the wheels into dest/wheels (networked machine); returns them. Fails if the bundle passes 50 MB."""
    wheels = Path(dest) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "--only-binary=:all:", "--no-deps", "--dest", str(wheels), *PLATFORM, *WHEELS)
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-binary=:all:", "--no-deps", "--dest", tmp, DEEPSPEED)
        sdist = next(Path(tmp).glob("deepspeed-*"))
        # DeepSpeed's setup.py imports torch: build against this environment's torch, with no compiled ops.
        _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(sdist),
             env={**os.environ, "DS_BUILD_OPS": "0"})
    files = sorted(wheels.glob("*.whl"))
    size = sum(f.stat().st_size for f in files) / 2**20
    if size > MAX_BUNDLE_MB:
        raise SystemExit(f"{wheels}: {size:.1f} MB of wheels is more than the {MAX_BUNDLE_MB} MB a device run carries")
    print(f"{wheels}: {len(files)} wheels, {size:.1f} MB")
    return files


def wheel_distribution(wheel: Path) -> str:
    """The distribution name of a wheel file (PEP 427: {name}-{version}-...), normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install(wheel_dir: Path, target: Path) -> dict[str, list[str]]:
    """Install (no index, no dependency resolution) each wheel whose distribution this interpreter lacks into
    `target`; returns {"installed": [...], "present": [...]} by distribution name. Put `target` on PYTHONPATH
    (after the source tree) for the processes that need it."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {wheel_dir} (make gpu-bundle fetches them)")
    todo = [w for w in wheels if not installed(wheel_distribution(w))]
    present = [wheel_distribution(w) for w in wheels if w not in todo]
    if todo:
        Path(target).mkdir(parents=True, exist_ok=True)
        _pip("install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check", "--quiet",
             "--target", str(target), *map(str, todo))
    return {"installed": [wheel_distribution(w) for w in todo], "present": present}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch the wheels (networked machine)")
    d.add_argument("--dest", default=str(REPO / ".gpu-bundle"))
    i = sub.add_parser("install", help="install the wheels the machine lacks into a folder")
    i.add_argument("--wheels", required=True)
    i.add_argument("--target", required=True)
    args = p.parse_args(argv)
    if args.cmd == "download":
        download(Path(args.dest))
    else:
        print(install(Path(args.wheels), Path(args.target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
