"""Loading feature-network weights from local files: safetensors or torch files read with weights_only=True.

Feature-network weights come from outside the run (a download, another tool's conversion), so they are
untrusted input (docs/distributed.md, "Trust boundary"): a `.safetensors` file is parsed by safetensors
(no code in the format), any other file by `torch.load(weights_only=True)`, which refuses every pickled
global outside torch's tensor allow-list before it can run. Nothing is downloaded. A refused or unreadable
file, and key or shape mismatches, raise `WeightsError` naming the file (and the refused global, or the
first offending keys).
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from phenoflow.errors import CheckpointError
from phenoflow.train.safe_load import refused_global


class WeightsError(CheckpointError, ValueError):
    """A weights file that is missing, unreadable, refused, or does not match the network; the message says which
    file and keys (a CheckpointError: the CLI prints it without a traceback, exit code 2)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors file or a torch file (weights_only=True; {"state_dict"/"model": ...}
    unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (weights are never downloaded; give a local path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # pickled code or objects other than tensors: refused before running
        if refused_global(e) is None:  # not a global: a corrupt or foreign file
            raise WeightsError(f"cannot read weights file {path}: not a torch file, or corrupt") from e
        raise WeightsError(f"weights file {path} refused: it pickles more than tensors and plain containers "
                           f"({refused_global(e)}); nothing from it was executed. Use a .safetensors file or a "
                           f"plain state dict saved with torch.save") from e
    except Exception as e:  # corrupt file, wrong format
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {first}") from e
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
    parts = state_problems(own, state, tuple(optional), "network")
    if parts:
        raise WeightsError(f"{path} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return module


def state_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], optional: tuple[str, ...],
                   what: str, floating: bool = False) -> list[str]:
    """What keeps `state` from loading into a network whose state dict is `own`: missing keys (but `optional`
    suffixes), unexpected keys, shape mismatches and, with `floating`, non-floating tensors where the network has
    floating ones; each with its count and the first few offenders. Empty when it loads."""
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)}, {what} {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    dtypes = [f"{k}: {state[k].dtype}" for k in own if floating and k in state and own[k].is_floating_point()
              and not state[k].is_floating_point()]
    parts = []
    for items, label, n in ((missing, "missing keys", 4), (unexpected, "unexpected keys", 4),
                            (shapes, "shape mismatches", 3), (dtypes, "tensors that are not floating point", 3)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[:n]})")
    return parts


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
    from phenoflow.train.checkpoint import current_umask

    tmp.chmod(0o666 & ~current_umask())  # safetensors writes 0600: honour the user's umask (shared clusters)
    tmp.replace(path)
    return path
