"""Numbered snapshots of a run's EMA profiles, for post-hoc EMA and checkpoint sweeps.

    run_dir/checkpoints/snapshots/snapshot-<samples, 12 digits>.pt

Each snapshot holds every tracked power-function EMA profile (train.ema_stds, full fp32 weights gathered from
every rank) at one point of the run, with its sample count and the profiles' exponents: what EDM2's post-hoc
reconstruction (phenoflow/train/posthoc_ema.py) combines into an average of any other width, and what a sweep
over training length evaluates. They are written at train.snapshot_every_{samples,steps} (default: ~20 points
of the run, and at its end), atomically like every checkpoint; train.snapshot_keep > 0 keeps only the newest
that many (post-hoc reconstruction wants them all: 0 keeps all). Resume does not read them; a rerun after a
kill rewrites the same snapshot with the same values.

Disk: one snapshot is (number of widths) x 4 bytes x parameters, e.g. 5.4 GB for MiT-XL/2 with two widths.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from phenoflow.train.checkpoint import load_checkpoint, save_checkpoint

SNAPSHOT_FORMAT = "phenoflow-snapshot-v1"
_NAME = re.compile(r"^snapshot-(\d{12})\.pt$")


def snapshot_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "snapshots"


def snapshot_path(run_dir: str | Path, samples: int) -> Path:
    return snapshot_dir(run_dir) / f"snapshot-{int(samples):012d}.pt"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(samples seen, path)] of a run's snapshots, oldest first (temporaries of killed writes ignored)."""
    folder = snapshot_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def write_snapshot(trainer, keep: int = 0) -> Path | None:
    """Gather every EMA profile (collective: every rank calls it) and write the snapshot on rank 0; then keep
    the newest `keep` (0: all). Returns the path on rank 0, None elsewhere."""
    eng, ema = trainer.engine, trainer.ema
    profiles = {key: eng.gather(avg) for key, avg in ema.state_dict().items()}
    path = None
    if eng.is_main:
        state = {"format": SNAPSHOT_FORMAT, "samples_seen": int(trainer.samples_seen),
                 "batch_size": int(trainer.cfg.train.batch_size), "stds": [float(s) for s in ema.stds],
                 "gammas": {k: float(g) for k, g in ema.gammas.items()}, "ema": profiles}
        path = save_checkpoint(state, snapshot_path(trainer.run_dir, trainer.samples_seen))
        if keep > 0:
            for _, old in list_snapshots(trainer.run_dir)[:-keep]:
                old.unlink(missing_ok=True)
    eng.barrier()
    return path


def load_snapshot(path: str | Path) -> dict:
    """A snapshot's dict (weights_only load); CheckpointError if it is not one."""
    from phenoflow.errors import CheckpointError

    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path} is not a phenoflow snapshot (format {state.get('format')!r})")
    return state


def snapshot_profile(state: dict, std: float) -> dict[str, torch.Tensor]:
    from phenoflow.train.ema import std_key

    key = std_key(std)
    if key not in state["ema"]:
        raise KeyError(f"snapshot at {state['samples_seen']} samples has no EMA std {std} (has {sorted(state['ema'])})")
    return state["ema"][key]
