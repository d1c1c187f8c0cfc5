"""Loading feature-network weights from local files: safetensors or torch files read with weights_only=True.

Nothing is downloaded. Key or shape mismatches raise `WeightsError` naming the file and the first offending keys.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or does not match the network; the message says which keys."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors file or a torch file (weights_only=True; {"state_dict"/"model": ...} unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (weights are never downloaded; give a local path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickled code, wrong format
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def load_into(module: torch.nn.Module, path: str | Path, strip_prefixes: Iterable[str] = ("module.",),
              optional: Iterable[str] = ("num_batches_tracked",)) -> torch.nn.Module:
    """Load the weights at `path` into `module`, strictly: every key present with the right shape.

    Keys ending in one of `optional` (e.g. BatchNorm's num_batches_tracked) may be absent from the file.
    """
    state = read_state_dict(path)
    for p in strip_prefixes:
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    own = module.state_dict()
    optional = tuple(optional)
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise WeightsError(f"{path} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return module


def save_state_dict(module: torch.nn.Module, path: str | Path) -> Path:
    """Write module's state dict atomically (.safetensors, or a torch file for any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path
