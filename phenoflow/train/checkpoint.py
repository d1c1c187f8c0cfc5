"""Checkpoints: written atomically (temporary file, fsync, rename), loaded without executing pickled code.

A training checkpoint is a nested dict of tensors and plain Python values saved with torch.save and read
back with torch.load(weights_only=True). The export is safetensors (raw and EMA weights) plus a JSON config.
Every read failure is a CheckpointError (phenoflow.errors) naming the file: missing, empty (0 bytes),
truncated or of another format, or holding tensors of the wrong shape for the model (tensor and both shapes).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from phenoflow.errors import CheckpointError


class WeightsMismatchError(CheckpointError, ValueError):
    """Weights that do not fit the model (names or shapes); also a ValueError, as before it existed."""


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else by setting and
    restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> Path:
    """write(tmp) to a temporary file beside `path`, fsync, rename over `path`. The file gets the mode a plain
    open() would give (0666 minus the user's umask): some writers (safetensors) create 0600 files, which nobody
    else on a shared cluster could read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    return _atomic(Path(path), lambda p: torch.save(state, p))


def _check_nonempty(path: Path, what: str) -> int:
    """The file's size; CheckpointError if it is missing, not a file or empty."""
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): phenoflow writes checkpoints atomically, so it "
                              f"was truncated or replaced by something else; move it away to start over")
    return size


def check_checkpoint_file(path: str | Path) -> None:
    """A cheap look at a torch checkpoint without loading it: present, not empty, and a complete zip archive
    (torch.save's format ends with a zip directory, which a truncated file lacks)."""
    path = Path(path)
    size = _check_nonempty(path, "checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is truncated or not a torch checkpoint (no zip "
                              f"directory at its end); move it away to start over")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is corrupt ({e}); move it away to start over") from e
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointError(f"checkpoint {path} is a zip archive but not a torch checkpoint (no data.pkl member)")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """torch.load(weights_only=True): no pickled code runs. Every failure is a CheckpointError naming the file."""
    path = Path(path)
    size = _check_nonempty(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one holding objects other than tensors: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path} ({size} bytes): truncated, corrupt or not a "
                              f"phenoflow checkpoint ({type(e).__name__}: {first})") from e


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; CheckpointError naming the file if it is missing, empty, truncated
    or not safetensors."""
    path = Path(path)
    size = _check_nonempty(path, "weights file")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (bad header, short file), OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"weights file {path} ({size} bytes) is truncated or not a safetensors file "
                              f"({type(e).__name__}: {first})") from e


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, built_from: str = "") -> None:
    """model.load_state_dict(state) after checking names and shapes: a WeightsMismatchError names the file and,
    for a shape mismatch, each tensor with the file's and the model's shape (torch's own error names neither
    file nor config). `built_from` says where the model's shape came from (e.g. the export's model.json)."""
    own = model.state_dict()
    origin = f" built from {built_from}" if built_from else ""
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise WeightsMismatchError(f"weights file {path} does not fit the model{origin}: tensors of the wrong shape: "
                              f"{'; '.join(wrong[:5])}{more}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsMismatchError(f"weights file {path} does not match the model{origin}: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state)


def write_json(obj: Any, path: str | Path) -> Path:
    return _atomic(Path(path), lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def ema_filename(std: float) -> str:
    return f"ema-{std:.4f}.safetensors"


def export_weights(export: Path, std: float) -> Path:
    """The export's weights file for EMA width `std` (0 = the raw weights); FileNotFoundError listing the files
    the export has when it is absent."""
    wfile = Path(export) / (ema_filename(std) if std else "model.safetensors")
    if not wfile.is_file():
        have = sorted(p.name for p in Path(export).glob("*.safetensors"))
        raise FileNotFoundError(f"weights {wfile} do not exist (eval.ema_std={std}); export has {have}")
    return wfile
