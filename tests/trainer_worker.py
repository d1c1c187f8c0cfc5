"""End-to-end Trainer checks under torchrun (run by tests/test_engine_trainer.py; not collected by pytest).

For each engine: an uninterrupted run to TOTAL samples, and a run stopped at HALF (checkpoint written at the
end) then rerun to TOTAL, which must resume from the engine-native checkpoint and export the same weights.
The stopped run's folder is copied first so that the test can resume it in a single process (world size
2 -> 1, consolidated path). One launch covers every engine to keep start-up cost (imports, DeepSpeed) once.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phenoflow.config import resolve
from phenoflow.train.trainer import Trainer

TINY = ["data.image_size=16", "data.channels=3", "data.train_images=256", "data.val_images=32",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2",
        "model.size=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "train.batch_size=16", "train.micro_batch_size=4", "train.lr=1e-3", "train.precision=fp32",
        "train.device=cpu", "train.log_every_samples=16", "train.ckpt_every_samples=64"]
HALF, TOTAL = 64, 128


def config(out: Path, name: str, engine: str, stage: int, total: int):
    return resolve("demo", TINY + [f"train.engine={engine}", f"train.zero_stage={stage}",
                                   f"train.total_samples={total}", f"run.out_dir={out}", f"run.name={name}"])


def trainer(cfg) -> Trainer:
    torch.manual_seed(0)  # the Trainer draws the initial weights from the global generator
    return Trainer(cfg)


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2].split(","):
        engine, stage = spec.split(":")
        tag = engine if engine != "deepspeed" else f"zero{stage}"
        trainer(config(out, f"{tag}-ref", engine, int(stage), TOTAL)).fit()
        trainer(config(out, f"{tag}-cut", engine, int(stage), HALF)).fit()
        if dist.get_rank() == 0:  # a copy of the stopped run for the single-process (world size 1) resume
            shutil.copytree(out / f"{tag}-cut", out / f"{tag}-single", ignore=shutil.ignore_patterns("export"))
            info = json.loads((out / f"{tag}-cut" / "checkpoints" / "native" / "latest.json").read_text()) \
                if (out / f"{tag}-cut" / "checkpoints" / "native" / "latest.json").is_file() else None
            (out / f"{tag}-native.json").write_text(json.dumps(info))
        dist.barrier()
        trainer(config(out, f"{tag}-cut", engine, int(stage), TOTAL)).fit()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
