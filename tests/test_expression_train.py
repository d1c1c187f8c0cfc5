"""Expression through the one trainer (phenoflow/modalities.py): synthetic counts or the real PerturBench
fixture -> preprocessing -> split -> expression shards -> gene-axis U-Net / MLP -> the same engines, EMA,
checkpoints and exact resume as images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phenoflow.config import resolve
from phenoflow.train.checkpoint import ema_filename, load_safetensors
from phenoflow.train.trainer import Trainer

FIXTURE = Path(__file__).parent / "data" / "perturbench_devel.h5ad"
TINY = ["expr.synth_cells=640", "expr.synth_genes=64", "model.unet_base_channels=8", "model.unet_channel_mult=[1,2]",
        "train.batch_size=32", "train.lr=1e-3", "train.precision=fp32", "train.device=cpu",
        "train.log_every_samples=32", "train.ckpt_every_samples=64", "data.samples_per_shard=256"]


def cfg(tmp_path, name, total, *extra):
    return resolve("expression-demo", TINY + [f"train.total_samples={total}", f"run.out_dir={tmp_path}",
                                              f"run.name={name}", *extra])


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_synthetic_expression_run_learns_and_keeps_its_data_recipe(tmp_path):
    c = cfg(tmp_path, "synth", 32 * 100, "train.lr=3e-3", "train.log_every_samples=320")
    torch.manual_seed(0)
    tr = Trainer(c)
    assert tr.modality.name == "expression" and tr.model.num_genes == len(tr.manifest["genes"])
    tr.fit()
    run = c.run_dir
    for f in ("split.csv", "preprocessing.json", "recipe.json", "manifest.json"):
        assert (run / "data" / f).is_file(), f
    losses = [e["loss"] for e in events(run) if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses  # measured: 20.3 -> 2.2 after 90 steps
    start = next(e for e in events(run) if e["event"] == "start")
    assert start["modality"] == "expression"


def test_stop_and_rerun_equals_uninterrupted(tmp_path):
    """Exact resume: a run stopped at 64 samples (its checkpoint) and rerun to 128 exports the same raw and EMA
    weights as a run straight to 128."""
    for name, totals in (("straight", [128]), ("resumed", [64, 128])):
        for total in totals:
            Trainer(cfg(tmp_path, name, total)).fit()
    for f in ("model.safetensors", ema_filename(0.05)):
        a = load_safetensors(tmp_path / "straight" / "export" / f)
        b = load_safetensors(tmp_path / "resumed" / "export" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("arch", ["unet", "mlp"])
def test_real_perturbench_fixture_trains(tmp_path, arch):
    c = resolve("expression-demo", [*TINY, "data.source=anndata", f"expr.h5ad={FIXTURE}", f"model.arch={arch}",
                                    "model.mlp_width=64", "model.mlp_depth=2", "train.total_samples=64",
                                    f"run.out_dir={tmp_path}", f"run.name=real-{arch}"])
    tr = Trainer(c)
    tr.fit()
    m = tr.manifest
    assert m["modality"] == "expression" and len(m["genes"]) == 452  # 500 genes, 48 never detected
    assert "TMSB4X" in m["genes"]
    counts = {s: v["count"] for s, v in m["splits"].items()}
    assert sum(counts.values()) == 5961 and counts["val"] > 0 and counts["test"] > 0
    assert (c.run_dir / "export" / "model.safetensors").is_file()
