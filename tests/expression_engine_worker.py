"""The expression modality through the distributed engines under torchrun (run by tests/test_expression_engines.py;
not collected by pytest): for each engine, an uninterrupted run to TOTAL cells and a run stopped at HALF then
rerun to TOTAL (resumed from the engine-native checkpoint); a copy of the stopped run is left for a
single-process (world size 2 -> 1) resume. The same trainer, engines and checkpoints as images: only the
modality's model, data and batch transform differ (phenoflow/modalities.py)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phenoflow.config import resolve
from phenoflow.train.trainer import Trainer

TINY = ["expr.synth_cells=640", "expr.synth_genes=64", "model.unet_base_channels=8", "model.unet_channel_mult=[1,2]",
        "train.batch_size=32", "train.micro_batch_size=16", "train.lr=1e-3", "train.precision=fp32",
        "train.device=cpu", "train.log_every_samples=32", "train.ckpt_every_samples=64",
        "data.samples_per_shard=256"]
HALF, TOTAL = 96, 192


def config(out: Path, name: str, engine: str, stage: int, total: int):
    return resolve("expression-demo", TINY + [f"train.engine={engine}", f"train.zero_stage={stage}",
                                              f"train.total_samples={total}", f"run.out_dir={out}",
                                              f"run.name={name}"])


def fit(cfg) -> None:
    torch.manual_seed(0)  # the Trainer draws the initial weights from the global generator
    Trainer(cfg).fit()


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2].split(","):
        engine, stage = spec.split(":")
        tag = engine if engine != "deepspeed" else f"zero{stage}"
        fit(config(out, f"{tag}-ref", engine, int(stage), TOTAL))
        fit(config(out, f"{tag}-cut", engine, int(stage), HALF))
        if dist.get_rank() == 0:
            shutil.copytree(out / f"{tag}-cut", out / f"{tag}-single", ignore=shutil.ignore_patterns("export"))
        dist.barrier()
        fit(config(out, f"{tag}-cut", engine, int(stage), TOTAL))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
