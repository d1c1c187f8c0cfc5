"""Expression runs on the distributed engines (2 CPU processes, gloo): ddp, DeepSpeed ZeRO-2 and FSDP2 train
the gene-axis U-Net through the one trainer; a run stopped half way and rerun resumes from its engine-native
checkpoint and exports the same weights as an uninterrupted run; the stopped run also resumes in a single
process (world size 2 -> 1) and finishes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import expression_engine_worker as EW
from test_engine_equivalence import torchrun
from test_engine_trainer import events, tag_of

from phenoflow.train.checkpoint import ema_filename, load_safetensors
from phenoflow.train.trainer import Trainer

ENGINES = ["ddp:0", "deepspeed:2", "fsdp2:0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("expr_engines")
    torchrun("expression_engine_worker.py", str(out), ",".join(ENGINES), timeout=900)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("spec", ENGINES)
def test_expression_native_resume_equals_uninterrupted(runs, spec):
    tag = tag_of(spec)
    starts = [e for e in events(runs / f"{tag}-cut") if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["samples_seen"] == EW.HALF
    assert all(s["modality"] == "expression" and s["world_size"] == 2 for s in starts)
    assert starts[0]["engine"] == spec.split(":")[0]
    losses = [e["loss"] for e in events(runs / f"{tag}-ref") if e["event"] == "train"]
    assert len(losses) >= 4 and all(0 < v < 50 for v in losses)
    for f in ("model.safetensors", ema_filename(0.05)):
        a = load_safetensors(runs / f"{tag}-ref" / "export" / f)
        b = load_safetensors(runs / f"{tag}-cut" / "export" / f)
        assert a.keys() == b.keys() and any("gene_embed" in k for k in a)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{f}:{k} differs after a native resume"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ENGINES)
def test_expression_world_size_change_resumes_in_one_process(runs, spec):
    tag = tag_of(spec)
    cfg = EW.config(runs, f"{tag}-single", "single", 0, EW.TOTAL)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    assert trainer.try_resume() and trainer.samples_seen == EW.HALF
    state = torch.load(runs / f"{tag}-single" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["layout"]["world_size"] == 2
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), state["model"][n]), n
    trainer.samples_seen = 0  # fit() resumes again from the file
    out = trainer.fit()
    start = [e for e in events(cfg.run_dir) if e["event"] == "start"][-1]
    assert start["resumed"] and start["samples_seen"] == EW.HALF and start["world_size"] == 1
    assert (out / "model.safetensors").is_file()
