"""Reading engine-native checkpoints without running code planted in them.

phenoflow's own files are read with `torch.load(weights_only=True)` or safetensors. The sharded engines' native
checkpoints are written by libraries that read them with full pickle:

- DeepSpeed reads `mp_rank_00_model_states.pt`, `zero_pp_rank_*_model_states.pt` and the
  `[bf16_]zero_pp_rank_*_optim_states.pt` files through its checkpoint engine with `weights_only=False`.
  `deepspeed_safe_load(ds)` swaps that engine, for the duration of one `load_checkpoint` call on one
  DeepSpeed engine, for one whose `load` is `torch.load(weights_only=True)` with the few DeepSpeed classes
  its files hold marked safe (`deepspeed_safe_globals()`); it also sets `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`
  for that call, so a read DeepSpeed makes by another path is restricted too. Both are undone on exit.
  `screen_torch_files` checks every file of the tag folder beforehand (the pickle opcodes only, no
  tensor data), so that every rank refuses a planted checkpoint before any of them loads a part of it.
- torch.distributed.checkpoint (FSDP2) pickles its `.metadata` file by design and reads it with
  `pickle.load`; non-tensor entries (the optimizer's param_groups) are stored as `torch.save` bytes and
  read with `weights_only=False`. `load_dcp_metadata` reads `.metadata` with `RestrictedUnpickler`
  (DCP's metadata dataclasses and enums, torch.Size, dtypes, layouts, paths; nothing else is resolved,
  so no other callable can run), and `dcp_safe_reader(path)` / `dcp_safe_planner(...)` are the reader
  and planner to pass to `dcp.load` so that DCP itself reads only through these.

A refusal is an `UnsafeCheckpointError` (a CheckpointError: exit code 2, no traceback) naming the file and
the global that was refused. The trust boundary is stated in docs/distributed.md ("Trust boundary").
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import os
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from phenoflow.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A native checkpoint file that would run code (or build objects outside the allow-list) when read."""


_ADVICE = ("it was not written by phenoflow or was tampered with; nothing from it was executed. Remove the run's "
           "checkpoints/native folder to resume from checkpoints/latest.pt (read with weights_only=True), or "
           "restore the run folder from a trusted copy")


# ---- DCP (FSDP2) -----------------------------------------------------------------------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_DCP_EXTRA = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset, length of each item
    ("torch.serialization", "_get_layout"),  # torch.layout by name (a table look-up)
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    # StorageMeta.checkpoint_id is the path the checkpoint was written to
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


def _dcp_global(module: str, name: str):
    """The object a DCP metadata pickle may name, or None if it is not on the allow-list."""
    import importlib

    if (module, name) in _DCP_EXTRA:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    if module == "torch" and "." not in name:
        obj = getattr(torch, name, None)
        return obj if isinstance(obj, _TORCH_VALUE_TYPES) else None  # torch.float32, torch.strided, ...
    if module in _DCP_MODULES and "." not in name:
        obj = getattr(importlib.import_module(module), name, None)
        # Only the module's own plain-data classes: dataclasses (built field by field) and enums (by value).
        if isinstance(obj, type) and obj.__module__ == module and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint metadata and refuses every other global before resolving it.

    A pickle can only call what `find_class` returns, so a `__reduce__` payload naming os.system, exec,
    eval, subprocess, getattr, ... stops here, before anything runs. Persistent ids are refused by the base
    class (no `persistent_load`)."""

    def __init__(self, file, source: str | Path):
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str):
        obj = _dcp_global(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to unpickle the global {module}.{name}, which a checkpoint metadata "
                f"file has no use for (allowed: torch.distributed.checkpoint metadata classes, torch.Size, "
                f"dtypes, layouts, paths); {_ADVICE}")
        return obj


def load_dcp_metadata(path: str | Path):
    """A DCP `.metadata` file read with RestrictedUnpickler; UnsafeCheckpointError naming the file if it names
    a forbidden global or is not DCP metadata, CheckpointError if it is missing or unreadable."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = RestrictedUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {e}") from e
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"checkpoint metadata {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(md).__name__}, not torch.distributed.checkpoint "
                                    f"Metadata; {_ADVICE}")
    return md


@functools.cache
def _dcp_classes():
    """The safe reader and planner classes (built on first use: torch.distributed.checkpoint is imported
    only when an FSDP2 checkpoint is read)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose metadata is read by load_dcp_metadata instead of pickle.load."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            md = load_dcp_metadata(Path(self.path) / name)
            if hasattr(md, "storage_meta"):  # as FileSystemReader.read_metadata does
                if md.storage_meta is None:
                    from torch.distributed.checkpoint.metadata import StorageMeta

                    md.storage_meta = StorageMeta()
                if hasattr(self, "load_id"):
                    md.storage_meta.load_id = self.load_id
            return md

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DefaultLoadPlanner reading non-tensor entries with torch.load(weights_only=True)."""

        source = "?"

        def load_bytes(self, read_item, value):
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(
                    f"{self._file_of(read_item)}: entry {fqn} refused by torch.load(weights_only=True) "
                    f"({_why(e)}); {_ADVICE}") from e
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

        def _file_of(self, read_item) -> str:
            info = getattr(self.metadata, "storage_data", None) or {}
            rel = getattr(info.get(read_item.storage_index), "relative_path", None)
            return str(Path(self.source) / rel) if rel else str(self.source)

    return SafeFileSystemReader, SafeLoadPlanner


def dcp_safe_reader(path: str | Path):
    """A FileSystemReader for `path` that reads `.metadata` with RestrictedUnpickler."""
    return _dcp_classes()[0](str(path))


def dcp_safe_planner(path: str | Path, **kwargs):
    """A DefaultLoadPlanner (same keyword arguments) whose byte entries are read with weights_only=True;
    `path` (the checkpoint folder) is named in errors."""
    planner = _dcp_classes()[1](**kwargs)
    planner.source = str(path)
    return planner


def refused_global(e: BaseException) -> str | None:
    """The line of torch's weights_only error naming the refused global ("Unsupported global: GLOBAL
    builtins.exec ..."), or None when the error is about something else (a corrupt or foreign file)."""
    for line in str(e).splitlines():
        if "GLOBAL" in line:
            return line.strip().split(" Please use")[0].removeprefix("WeightsUnpickler error: ")
    return None


def _why(e: BaseException) -> str:
    named = refused_global(e)
    if named:
        return named
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Weights only", "Check"))]
    return lines[-1] if lines else type(e).__name__


# ---- DeepSpeed ------------------------------------------------------------------------------------------
def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files pickle (found by reading ZeRO-1/2/3 fp32 and bf16 files,
    `torch.serialization.get_unsafe_globals_in_checkpoint`): plain data holders with no code on load.
    ZeroStageEnum (an int enum: the stage), fragment_address (numel, start of a ZeRO-1/2 fragment),
    LossScaler / DynamicLossScaler (the loss-scale state; the dynamic one under fp16)."""
    out = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler")):
        try:
            import importlib

            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is not stored either
            pass
    return out


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def screen_torch_files(files: Iterable[str | Path], allowed: list) -> None:
    """Refuse (UnsafeCheckpointError naming the file and globals) any torch file whose pickle names a global
    outside torch's weights_only allow-list and `allowed`. Reads the pickle opcodes only, never the tensors,
    and executes nothing."""
    names = {_qualname(g) for g in allowed}
    for f in files:
        f = Path(f)
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except (ValueError, RuntimeError, OSError):  # not torch's zip format (legacy, foreign): a full load decides
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(f, map_location="cpu", weights_only=True)
                continue
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"{f}: refused by torch.load(weights_only=True) ({_why(e)}); "
                                            f"{_ADVICE}") from e
            except Exception as e:
                raise CheckpointError(f"cannot read checkpoint file {f} ({type(e).__name__}: {e})") from e
        bad = sorted(g for g in found if g not in names)
        if bad:
            raise UnsafeCheckpointError(f"{f}: its pickle names globals outside the allow-list ({', '.join(bad)}); "
                                        f"{_ADVICE}")


class _WeightsOnlyCheckpointEngine:
    """Stands in for a DeepSpeed checkpoint engine during one load: `load` is torch.load(weights_only=True)
    with `allowed` marked safe; every other attribute is the wrapped engine's."""

    def __init__(self, inner, allowed: list):
        self._inner = inner
        self._allowed = allowed

    def load(self, path, map_location=None):
        try:
            with torch.serialization.safe_globals(self._allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{path}: refused by torch.load(weights_only=True) ({_why(e)}); "
                                        f"{_ADVICE}") from e

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def deepspeed_safe_load(ds_engine, allowed: list | None = None) -> Iterator[None]:
    """For one `ds_engine.load_checkpoint(...)`: its checkpoint engine reads with weights_only=True and every
    torch.load in the process is forced to weights_only (TORCH_FORCE_WEIGHTS_ONLY_LOAD), with `allowed`
    (default deepspeed_safe_globals()) marked safe. Everything is restored on exit."""
    allowed = deepspeed_safe_globals() if allowed is None else allowed
    inner = ds_engine.checkpoint_engine
    old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    ds_engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(inner, allowed)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        ds_engine.checkpoint_engine = inner
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


__all__ = [
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "dcp_safe_planner",
    "dcp_safe_reader",
    "deepspeed_safe_globals",
    "deepspeed_safe_load",
    "load_dcp_metadata",
    "refused_global",
    "screen_torch_files",
]
