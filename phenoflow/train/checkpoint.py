"""Checkpoints: written atomically (temporary file, fsync, rename), loaded without executing pickled code.

A training checkpoint is a nested dict of tensors and plain Python values saved with torch.save and read
back with torch.load(weights_only=True). The export is safetensors (raw and EMA weights) plus a JSON config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    return _atomic(Path(path), lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return load_file(str(path))


def write_json(obj: Any, path: str | Path) -> Path:
    return _atomic(Path(path), lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def ema_filename(std: float) -> str:
    return f"ema-{std:.4f}.safetensors"
