"""End-to-end Trainer checks under torchrun (run by tests/test_engine_trainer.py; not collected by pytest).

For each engine: an uninterrupted run to TOTAL samples, and a run stopped at HALF (checkpoint written at the
end) then rerun to TOTAL, which must resume from the engine-native checkpoint and export the same weights.
The stopped run's folder is copied first so that the test can resume it in a single process (world size
2 -> 1, consolidated path). The uninterrupted run is "killed" after its last checkpoint, before its export
(KillBeforeExport), then rerun (it must export without a step or a checkpoint write), then rerun once more
(a finished run: the same); the checkpoint files' identities are recorded in <tag>-rerun.json. Engines given
in the optional third argument get only that rerun scenario (at HALF samples). One launch covers every engine
to keep start-up cost (imports, DeepSpeed) once.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phenoflow.config import resolve
from phenoflow.train.trainer import NonFiniteError, Trainer

TINY = ["model.prediction=velocity", "flow.time_sampler=uniform", "data.image_size=16", "data.channels=3", "data.train_images=256", "data.val_images=32",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2",
        "model.size=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "train.batch_size=16", "train.micro_batch_size=4", "train.lr=1e-3", "train.precision=fp32",
        "train.device=cpu", "train.log_every_samples=16", "train.ckpt_every_samples=64"]
HALF, TOTAL = 64, 128
NONFINITE_ENGINES = ["fsdp2", "zero2", "zero3"]  # `--nonfinite`: a step at lr = inf (tests/test_nonfinite.py)


def config(out: Path, name: str, engine: str, stage: int, total: int):
    return resolve("demo", TINY + [f"train.engine={engine}", f"train.zero_stage={stage}",
                                   f"train.total_samples={total}", f"run.out_dir={out}", f"run.name={name}"])


def trainer(cfg, cls=Trainer) -> Trainer:
    torch.manual_seed(0)  # the Trainer draws the initial weights from the global generator
    return cls(cfg)


class KilledBeforeExport(RuntimeError):
    pass


class KillBeforeExport(Trainer):
    """Stands for a run killed after its last checkpoint, before its export (every rank stops there)."""

    def export(self):
        raise KilledBeforeExport("simulated kill before the export")


class AbsurdLR(Trainer):
    """From `bad_at` samples on, the optimizer's learning rate is `lr` (past config validation): the gradient
    is finite, the step turns every weight non-finite. Records the full weights just before that step (rank 0)."""

    bad_at: int = 10**9
    lr: float = float("inf")

    def train_step(self, it):
        if self.samples_seen == self.bad_at:
            self.before_bad = self.engine.full_model_state()  # collective; None off rank 0
            for group in self.engine.optimizer.param_groups:
                group["lr"] = self.lr
        return super().train_step(it)


def nonfinite_scenario(out: Path, tag: str, engine: str, stage: int) -> None:
    """A step at lr = inf from 48 samples: every rank must stop with NonFiniteError, the weights restored."""
    tr = trainer(config(out, f"{tag}-lr", engine, stage, 16 * 6), AbsurdLR)
    tr.bad_at = 48
    try:
        tr.fit()
        raised, message = False, ""
    except NonFiniteError as e:
        raised, message = True, str(e)
    # The module's compute weights equal the restored masters on every rank (ZeRO-2: each rank's full copy).
    full = tr.engine.broadcast_object(tr.engine.full_model_state())
    if engine == "deepspeed":
        import deepspeed

        params = list(tr.model.named_parameters())
        gathered = deepspeed.zero.GatheredParameters([p for _, p in params]) if stage == 3 else contextlib.nullcontext()
        with gathered:
            same = all(torch.equal(p.detach().float().cpu(), full[n]) for n, p in params)
    else:
        same = all(torch.isfinite(p.detach().to_local()).all() for p in tr.model.parameters())
    flags = tr.engine.gather_objects((raised, same))
    if dist.get_rank() == 0:
        torch.save(tr.before_bad, out / f"{tag}-lr-before.pt")
        (out / f"{tag}-lr.json").write_text(json.dumps({"raised": [f[0] for f in flags], "message": message,
                                                         "rank_weights_equal": [f[1] for f in flags]}))
    dist.barrier()


def checkpoint_files(run: Path) -> dict[str, list[int]]:
    """{path under checkpoints/: [inode, mtime_ns, size]}: any rewrite (atomic rename) changes the inode."""
    root = run / "checkpoints"
    return {str(p.relative_to(root)): [p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size]
            for p in sorted(root.rglob("*")) if p.is_file()}


def rerun_scenario(out: Path, tag: str, engine: str, stage: int, total: int) -> None:
    """Killed before the export, rerun (finishes), rerun again (finished): checkpoint files after each."""
    cfg = config(out, f"{tag}-ref", engine, stage, total)
    try:
        trainer(cfg, KillBeforeExport).fit()
        raise AssertionError("the simulated kill did not happen")
    except KilledBeforeExport:
        pass
    record = {"killed": checkpoint_files(cfg.run_dir)}
    dist.barrier()
    trainer(cfg).fit()
    record["finished"] = checkpoint_files(cfg.run_dir)
    dist.barrier()
    trainer(cfg).fit()
    record["rerun"] = checkpoint_files(cfg.run_dir)
    # Right after a resume, before any step, the consolidated state (Adam moments included) is latest.pt's.
    # (ZeRO-1/2 used to fail here: DeepSpeed links the moments' fragments only at the first step.)
    tr = trainer(cfg)
    tr.try_resume()
    state = tr.state_dict()
    tr.run_lock.release()
    if dist.get_rank() == 0:
        disk = torch.load(cfg.run_dir / "checkpoints" / "latest.pt", weights_only=True)
        record["state_after_resume"] = {
            key: all(torch.equal(state[key][k][n], disk[key][k][n]) for k in disk[key] if k != "step"
                     for n in disk[key][k]) if key != "model" else
            all(torch.equal(state["model"][n], t) for n, t in disk["model"].items())
            for key in ("model", "optimizer", "ema")}
        record["state_after_resume"]["step"] = state["optimizer"]["step"] == disk["optimizer"]["step"] > 0
        (out / f"{tag}-rerun.json").write_text(json.dumps(record))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] == "--nonfinite":
        for tag in NONFINITE_ENGINES:
            nonfinite_scenario(out, tag, "fsdp2" if tag == "fsdp2" else "deepspeed", int(tag[-1]) if tag != "fsdp2" else 0)
        dist.barrier()
        dist.destroy_process_group()
        return
    for spec in sys.argv[2].split(","):
        engine, stage = spec.split(":")
        tag = engine if engine != "deepspeed" else f"zero{stage}"
        rerun_scenario(out, tag, engine, int(stage), TOTAL)
        trainer(config(out, f"{tag}-cut", engine, int(stage), HALF)).fit()
        if dist.get_rank() == 0:  # a copy of the stopped run for the single-process (world size 1) resume
            shutil.copytree(out / f"{tag}-cut", out / f"{tag}-single", ignore=shutil.ignore_patterns("export"))
            info = json.loads((out / f"{tag}-cut" / "checkpoints" / "native" / "latest.json").read_text()) \
                if (out / f"{tag}-cut" / "checkpoints" / "native" / "latest.json").is_file() else None
            (out / f"{tag}-native.json").write_text(json.dumps(info))
        dist.barrier()
        trainer(config(out, f"{tag}-cut", engine, int(stage), TOTAL)).fit()
    for spec in (sys.argv[3].split(",") if len(sys.argv) > 3 else []):
        engine, stage = spec.split(":")
        rerun_scenario(out, f"zero{stage}" if engine == "deepspeed" else engine, engine, int(stage), HALF)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
