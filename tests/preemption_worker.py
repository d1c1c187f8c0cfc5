"""SIGTERM mid-run under torchrun (2 CPU processes, gloo, ddp); run by tests/test_preemption.py, not collected.

    ref   an uninterrupted run to TOTAL samples
    cut   the same run; rank 1 (only) sends itself SIGTERM when it reaches SIGNAL_AT samples: every rank must
          finish the step, checkpoint and raise Preempted (exit code 75); then the same config is rerun and
          must finish with the weights, EMA and snapshots of `ref`.
Writes OUT/preemption.json (rank 0): what each rank saw.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phenoflow.config import resolve
from phenoflow.train.preemption import Preempted
from phenoflow.train.trainer import Trainer

TINY = ["model.prediction=velocity", "flow.time_sampler=uniform", "data.image_size=16", "data.channels=3", "data.train_images=256", "data.val_images=32",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2",
        "model.size=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "train.batch_size=16", "train.micro_batch_size=4", "train.lr=1e-3", "train.precision=fp32",
        "train.device=cpu", "train.engine=ddp", "train.log_every_samples=0", "train.ckpt_every_samples=0",
        "model.proj_dropout=0.1"]
TOTAL, SIGNAL_AT = 16 * 20, 16 * 7  # checkpoints (auto) every 2 steps: the stop falls between two of them


def config(out: Path, name: str):
    return resolve("demo", TINY + [f"train.total_samples={TOTAL}", f"run.out_dir={out}", f"run.name={name}"])


class SignalledTrainer(Trainer):
    """Rank 1 sends itself SIGTERM inside the step that starts at SIGNAL_AT samples."""

    def train_step(self, it):
        if self.engine.rank == 1 and self.samples_seen == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(it)


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    Trainer(config(out, "ref")).fit()
    dist.barrier()
    torch.manual_seed(0)
    tr = SignalledTrainer(config(out, "cut"))
    record = {"rank": dist.get_rank()}
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    try:
        tr.fit()
        record["preempted"] = False
    except Preempted as e:
        record.update(preempted=True, exit_code=e.exit_code, message=str(e), samples=tr.samples_seen,
                      saved=tr.saved_samples)
    record["handlers_restored"] = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    dist.barrier()
    torch.manual_seed(0)
    Trainer(config(out, "cut")).fit()  # the rerun: resumes and finishes
    if dist.get_rank() == 0:
        (out / "preemption.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
