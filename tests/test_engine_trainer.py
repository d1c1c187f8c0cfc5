"""The Trainer under torchrun (2 CPU processes, gloo) with ddp, DeepSpeed ZeRO-3 and fsdp2, end to end through
the shard loader: a run stopped at half way and rerun resumes from its engine-native checkpoint and exports
the same weights as an uninterrupted run; the stopped run also resumes in a single process (world size
2 -> 1) from the consolidated checkpoint, with the loader position carried over, and finishes. On every
engine (ZeRO-1 and -2 too) a run killed after its last checkpoint finishes by rerunning, and rerunning a
finished run only exports: no step, no checkpoint write.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_worker as TW
from test_engine_equivalence import torchrun

from phenoflow.train.checkpoint import ema_filename, load_safetensors
from phenoflow.train.trainer import Trainer

ENGINES = ["ddp:0", "deepspeed:3", "fsdp2:0"]
RERUN_ONLY = ["deepspeed:1", "deepspeed:2"]  # only the rerun scenario (at HALF samples)


def tag_of(spec: str) -> str:
    name, stage = spec.split(":")
    return name if name != "deepspeed" else f"zero{stage}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("trainer")
    torchrun("trainer_worker.py", str(out), ",".join(ENGINES), ",".join(RERUN_ONLY))
    return out


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ENGINES)
def test_native_resume_equals_uninterrupted(runs, spec):
    tag = tag_of(spec)
    starts = [e for e in events(runs / f"{tag}-cut") if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["samples_seen"] == TW.HALF
    native = json.loads((runs / f"{tag}-native.json").read_text())
    if tag == "ddp":  # replicated: the consolidated checkpoint is the native one
        assert native is None
    else:
        assert native["layout"]["engine"] == spec.split(":")[0] and native["layout"]["world_size"] == 2
    for f in ("model.safetensors", ema_filename(0.01), ema_filename(0.05)):
        a = load_safetensors(runs / f"{tag}-ref" / "export" / f)
        b = load_safetensors(runs / f"{tag}-cut" / "export" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{f}:{k} differs after a native resume"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ENGINES)
def test_world_size_change_resumes_in_one_process(runs, spec):
    tag = tag_of(spec)
    cfg = TW.config(runs, f"{tag}-single", "single", 0, TW.TOTAL)
    trainer = Trainer(cfg)
    assert trainer.try_resume()
    state = torch.load(runs / f"{tag}-single" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["layout"]["world_size"] == 2 and len(state["loader"]) == 2
    assert trainer.samples_seen == TW.HALF
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), state["model"][n]), n
    for key, avg in trainer.ema.state_dict().items():
        for n, t in state["ema"][key].items():
            assert torch.equal(avg[n], t), (key, n)
    # Loader: 2 ranks x 8 micro-batches of 4 consumed (64 samples) -> one rank continues at batch 16 of epoch 0.
    ls = trainer.loader.state_dict()
    assert (ls["epoch"], ls["batch"], ls["world_size"]) == (0, TW.HALF // 4, 1), ls
    trainer.samples_seen = 0  # fit() resumes again from the file; check it runs to the end from there
    out = trainer.fit()
    ev = events(cfg.run_dir)
    start = [e for e in ev if e["event"] == "start"][-1]
    assert start["resumed"] and start["samples_seen"] == TW.HALF and start["world_size"] == 1
    losses = [e["loss"] for e in ev if e["event"] == "train" and e["samples"] > TW.HALF]
    assert losses and all(0 < v < 5 for v in losses)
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ENGINES + RERUN_ONLY)
def test_rerun_finished_is_a_noop(runs, spec):
    """Killed after the last checkpoint (before the export), rerun: it exports; rerun again: it exports again.
    Neither rerun takes a step or writes a checkpoint (DeepSpeed used to crash here in local_pieces)."""
    tag = tag_of(spec)
    total = TW.TOTAL if spec in ENGINES else TW.HALF
    rec = json.loads((runs / f"{tag}-rerun.json").read_text())
    assert rec["killed"] and "latest.pt" in rec["killed"]
    assert rec["finished"] == rec["killed"], "the rerun after a kill before the export rewrote checkpoints"
    assert rec["rerun"] == rec["killed"], "the rerun of a finished run rewrote checkpoints"
    assert rec["state_after_resume"] == {"model": True, "optimizer": True, "ema": True, "step": True}
    ev = events(runs / f"{tag}-ref")
    marks = [(i, e) for i, e in enumerate(ev) if e["event"] in ("start", "end")]
    assert [e["event"] for _, e in marks] == ["start", "start", "end", "start", "end"]
    assert all(e["samples_seen"] == total for _, e in marks[1:])
    assert [e["resumed"] for _, e in marks if e["event"] == "start"] == [False, True, True]
    assert not [e for e in ev[marks[1][0]:] if e["event"] == "train"], "a rerun took a training step"
    assert (runs / f"{tag}-ref" / "export" / "model.safetensors").is_file()
