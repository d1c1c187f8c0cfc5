"""Rerunning a finished run is a no-op that exports again: no training step, no checkpoint write (the files
keep their inode and modification time), a start and an end event in the log. A run killed after its last
checkpoint but before its export finishes by rerunning, again without a step or a checkpoint write.
Single process here; every distributed engine in tests/test_engine_trainer.py::test_rerun_finished_is_a_noop."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_worker as TW

from phenoflow.train.checkpoint import ema_filename, load_safetensors


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_rerun_of_a_finished_run_only_exports(tmp_path):
    cfg = TW.config(tmp_path, "done", "single", 0, TW.HALF)
    TW.trainer(cfg).fit()
    run = cfg.run_dir
    before = TW.checkpoint_files(run)
    export = {f: load_safetensors(run / "export" / f) for f in ("model.safetensors", ema_filename(0.05))}
    n_events = len(events(run))

    TW.trainer(cfg).fit()
    assert TW.checkpoint_files(run) == before, "a rerun of a finished run rewrote checkpoints"
    new = events(run)[n_events:]
    assert [e["event"] for e in new] == ["start", "end"], new
    assert new[0]["resumed"] and new[0]["samples_seen"] == TW.HALF and new[1]["samples_seen"] == TW.HALF
    for f, tensors in export.items():
        again = load_safetensors(run / "export" / f)
        assert all(torch.equal(again[k], v) for k, v in tensors.items()), f


def test_killed_before_export_finishes_by_rerunning(tmp_path):
    cfg = TW.config(tmp_path, "cut", "single", 0, TW.HALF)
    torch.manual_seed(0)
    with pytest.raises(TW.KilledBeforeExport):
        TW.KillBeforeExport(cfg).fit()
    run = cfg.run_dir
    assert not (run / "export").exists() and (run / "checkpoints" / "latest.pt").is_file()
    before = TW.checkpoint_files(run)
    n_events = len(events(run))

    out = TW.trainer(cfg).fit()
    assert (out / "model.safetensors").is_file() and (out / ema_filename(0.05)).is_file()
    assert TW.checkpoint_files(run) == before
    new = events(run)[n_events:]
    assert [e["event"] for e in new] == ["start", "end"] and new[0]["samples_seen"] == TW.HALF
