"""The training loop. Time is counted in samples seen; resume by rerunning the same command.

One step (noise-to-data flow matching, ARCHITECTURE.md section 3):
    x1 = the modality's data sample              images: dequantise(flip(encode(image))) on [-1, 1]
    x0 ~ N(0, I)  (or a coupling's source)        source; coupling=control: a same-group control + noise
    t  ~ U[0, 1)  (or logit-normal)
    x_t, v* = path(x0, x1, t)                      linear: x_t = t x1 + (1 - t) x0, v* = x1 - x0
    loss = || v_theta(x_t, t, labels) - v* ||^2   mean over pixels and batch
Every random draw of a step derives from (seed, rank, samples seen), so a resumed run repeats exactly what an
uninterrupted one does. Models customise training by overriding `Trainer.compute_loss`.
"""
from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from phenoflow.config import Config, dump_yaml, to_dict
from phenoflow.data.loader import ShardLoader
from phenoflow.data.shards import load_manifest
from phenoflow.errors import NonFiniteError  # exit code 3; re-exported
from phenoflow.flow.couplings import minibatch_ot
from phenoflow.flow.paths import build_path, sample_time
from phenoflow.modalities import get_modality
from phenoflow.train.checkpoint import (
    CheckpointError,
    ema_filename,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
    write_json,
)
from phenoflow.train.devices import device_peak
from phenoflow.train.ema import PowerFunctionEMA
from phenoflow.train.engines import build_engine
from phenoflow.train.finetune import (
    init_from_checkpoint,
    parameter_counts,
    setup_trainable,
)
from phenoflow.train.preemption import Preempted, StopRequest
from phenoflow.train.preflight import preflight
from phenoflow.train.run_folder import RunLock, take_run_folder
from phenoflow.train.run_log import Cadence, RunLog
from phenoflow.train.snapshots import write_snapshot

__all__ = ["NonFiniteError", "Preempted", "RunLog", "Trainer", "train"]


def step_seed(seed: int, rank: int, samples_seen: int) -> int:
    """A 63-bit seed for one step, mixed from (seed, rank, samples seen)."""
    return int(np.random.SeedSequence([seed, rank, samples_seen]).generate_state(1, dtype=np.uint64)[0] >> 1)


def vocab_sizes(manifest: dict) -> dict[str, int]:
    """The microscopy label groups of a manifest (kept for callers; modalities define their own)."""
    return get_modality("microscopy").vocab_sizes(manifest)


def carry_loader_state(states: list[dict], loader: ShardLoader, rank: int) -> dict:
    """The loader state for this rank from the saved states of every old rank. Same world size and micro
    batch: exactly this rank's old state (exact resume). Otherwise (world size changed) the old epoch is kept
    and the new ranks start at the same fraction of it: the samples consumed globally divided by the new
    global micro-batch. Within that one epoch the new ranks' parts differ from the old ones, so a few samples
    may repeat or be missed in it; later epochs are exactly-once again."""
    cur = loader.state_dict()
    if len(states) == loader.world_size and all(states[rank].get(k) == cur[k] for k in ("world_size", "batch_size")):
        return states[rank]
    consumed = sum(int(s["batch"]) * int(s["batch_size"]) for s in states)
    epoch = int(states[0]["epoch"])
    batch = consumed // (loader.world_size * loader.batch_size)
    return {**cur, "epoch": epoch, "batch": batch, "samples_in_epoch": batch * loader.batch_size,
            "skipped": sum(int(s.get("skipped", 0)) for s in states)}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.engine = build_engine(cfg)
        preflight(cfg, world_size=self.engine.world_size)  # config vs data and run folder, before any write
        self.engine.guard_weights = cfg.train.weight_guard
        self.device = self.engine.device
        t = cfg.train
        world = self.engine.world_size
        if t.batch_size % world:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the world size {world}")
        self.micro_batch = t.micro_batch_size or t.batch_size // world
        if t.batch_size % (self.micro_batch * world):
            raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of micro batch {self.micro_batch}"
                             f" x world size {world}")
        self.accum_steps = t.batch_size // (self.micro_batch * world)

        # One run per folder: rank 0 locks it (every rank fails at once if another run holds it) and removes
        # the temporaries of killed writes, before anything is written (phenoflow/train/run_folder.py).
        self.run_lock = RunLock(self.run_dir)
        self.removed_temporaries = take_run_folder(self.run_lock, self.engine)
        if self.engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
        self.engine.barrier()
        self.modality = get_modality(cfg)  # model, data, batch transform (phenoflow/modalities.py)
        self.data_dir = self.modality.prepare_data(cfg) if self.engine.is_main else None
        self.engine.barrier()
        self.data_dir = self.data_dir or self.modality.prepare_data(cfg)
        self.manifest = load_manifest(self.data_dir)
        if self.engine.is_main:
            write_json(self.manifest["vocabs"], self.run_dir / "vocab.json")
        self.vocab_sizes = self.modality.vocab_sizes(self.manifest)

        torch.manual_seed(t.seed)  # the initial weights depend on the seed alone
        self.model = setup_trainable(self.engine, self.modality.build_model(cfg, self.vocab_sizes, self.manifest),
                                     t.trainable)  # freezes by train.trainable before the optimizer exists
        self.ema = PowerFunctionEMA(self.engine.ema_view(), stds=tuple(t.ema_stds))  # fp32 masters, local shards
        self.path = build_path(cfg.flow)
        self.loader = ShardLoader(
            self.data_dir, "train", self.micro_batch, rank=self.engine.rank, world_size=world,
            num_workers=cfg.data.num_workers, seed=t.seed, shuffle=True, drop_last=True, infinite=True,
            backend=cfg.data.backend, bad_sample_policy=cfg.data.bad_sample_policy,
            shuffle_buffer=cfg.data.shuffle_buffer, channels_last=cfg.data.channels_last,
            checksums=cfg.data.checksums)
        self.loss_mask = self.modality.loss_mask(self.manifest)  # None: every entry of x1 enters the loss
        self.control_pool = None  # flow.coupling=control: same-group controls of the train split, indexed at start
        if cfg.flow.coupling == "control":
            from phenoflow.train.control_pool import build_control_pool

            self.control_pool = build_control_pool(cfg, self.modality, self.data_dir, self.manifest)
        self.samples_seen = 0
        self.saved_samples = -1  # samples_seen of the last complete checkpoint (native + consolidated) on disk
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.ckpt_path = self.run_dir / "checkpoints" / "latest.pt"
        self.flops_per_sample = self.modality.train_flops(self.model)  # training FLOP per sample; 0 = unknown
        self.device_name, self.peak_flops = device_peak(self.device, t.peak_tflops)  # None: MFU omitted
        self.stop = StopRequest(self.run_dir, watch_file=self.engine.is_main)  # SIGTERM / SIGUSR1 / run_dir/STOP
        self._flags = (False, False)  # (stop wish, extra log line wish) of this rank, combined in train_step

    # ---- state -----------------------------------------------------------------------------------------
    # Checkpoint layout in run_dir/checkpoints/:
    #   latest.pt            consolidated: full fp32 weights, Adam moments and EMA, every rank's loader state
    #                        (rank 0 writes it; any engine and world size resumes from it)
    #   native/<tag>/        sharded engines only: the engine's own files (DeepSpeed save_checkpoint, FSDP2
    #                        torch.distributed.checkpoint) + trainer-rankNNNNN.pt (EMA shards, loader, counters)
    #   native/latest.json   pointer to the last complete native checkpoint and the layout it needs
    # Resume prefers the native checkpoint when engine, world size and ZeRO stage match, else latest.pt.
    CONSOLIDATED_FORMAT = "phenoflow-consolidated-v1"

    @property
    def native_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "native"

    def _rank_state(self) -> dict:
        """This rank's share of a native checkpoint: EMA pieces, loader position, counters."""
        return {"ema": self.ema.state_dict(), "loader": self.loader.state_dict(), "samples_seen": self.samples_seen,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row,
                "control_pool": self.control_pool.state_dict() if self.control_pool else None}

    def state_dict(self) -> dict | None:
        """The consolidated checkpoint (collective; the dict on rank 0, None elsewhere)."""
        eng = self.engine
        full = eng.full_state()
        ema = {key: eng.gather(avg) for key, avg in self.ema.state_dict().items()}
        loaders = eng.gather_objects(self.loader.state_dict())
        pools = eng.gather_objects(self.control_pool.state_dict()) if self.control_pool else None
        if not eng.is_main:
            return None
        return {"format": self.CONSOLIDATED_FORMAT, "model": full["model"], "optimizer": full["optimizer"],
                "ema": ema, "loader": loaders, "samples_seen": self.samples_seen,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row, "layout": eng.native_signature(), "config": to_dict(self.cfg),
                "control_pool": pools}

    def save(self, path: Path | None = None) -> None:
        """Checkpoint; every rank calls it. Sharded engines first write their native checkpoint (each rank its
        own files, then rank 0 moves the pointer); then rank 0 writes the consolidated state to `path` (default
        latest.pt). With `path` given (the non-finite diagnostic) only the consolidated state is written."""
        eng = self.engine
        if path is None and not eng.replicated:
            tag = f"s{self.samples_seen:012d}"
            tag_dir = self.native_dir / tag
            tag_dir.mkdir(parents=True, exist_ok=True)
            eng.save_native(tag_dir)
            save_checkpoint(self._rank_state(), tag_dir / f"trainer-rank{eng.rank:05d}.pt")
            eng.barrier()  # every rank's files are complete before the pointer moves
            if eng.is_main:
                write_json({"tag": tag, "layout": eng.native_signature(), "samples_seen": self.samples_seen},
                           self.native_dir / "latest.json")
                for old in self.native_dir.iterdir():
                    if old.is_dir() and old.name != tag:
                        shutil.rmtree(old, ignore_errors=True)
        state = self.state_dict()
        if eng.is_main:
            save_checkpoint(state, path or self.ckpt_path)
        eng.barrier()
        if path is None:
            self.saved_samples = self.samples_seen

    def try_resume(self) -> bool:
        eng = self.engine
        pointer = self.native_dir / "latest.json"
        if not eng.replicated and pointer.is_file():
            info = json.loads(pointer.read_text())
            if info.get("layout") == eng.native_signature():
                tag_dir = self.native_dir / info["tag"]
                eng.load_native(tag_dir)
                st = load_checkpoint(tag_dir / f"trainer-rank{eng.rank:05d}.pt")
                self.ema.load_state_dict(st["ema"])
                self.loader.load_state_dict(st["loader"])
                self.samples_seen = int(st["samples_seen"])
                self.nonfinite_total = int(st.get("nonfinite_total", 0))
                self.nonfinite_in_row = int(st.get("nonfinite_in_row", 0))
                if self.control_pool and st.get("control_pool"):
                    self.control_pool.load_state_dict(st["control_pool"])
                # Complete only if latest.pt was written after this native checkpoint (a kill between the two
                # leaves it older): then the end of fit() writes both again instead of exporting at once.
                if self._consolidated_samples() == self.samples_seen:
                    self.saved_samples = self.samples_seen
                return True
        if not self.ckpt_path.is_file():
            return False
        self.load_consolidated(self.ckpt_path)
        self.saved_samples = self.samples_seen
        return True

    def _consolidated_samples(self) -> int:
        """samples_seen recorded in latest.pt (-1 if absent or unreadable); rank 0 reads it (mmap: the tensors
        are not read), every rank gets the value."""
        seen = -1
        if self.engine.is_main and self.ckpt_path.is_file():
            try:
                seen = int(torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)["samples_seen"])
            except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError):
                seen = -1  # unreadable: rewritten by the next save
        return int(self.engine.broadcast_object(seen))

    def load_consolidated(self, path: Path) -> None:
        """Resume from a consolidated checkpoint written by any engine at any world size. Every rank maps the
        file (mmap: one copy in the page cache per node) and keeps its own parts."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
        if not isinstance(state, dict) or state.get("format") != self.CONSOLIDATED_FORMAT:
            fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path}: not a consolidated phenoflow checkpoint (format {fmt!r}); move it "
                                  f"away to start the run afresh")
        eng = self.engine
        eng.load_full_state(state)
        like = self.ema.state_dict()
        self.ema.load_state_dict({key: eng.scatter(state["ema"][key], like[key]) for key in like})
        self.loader.load_state_dict(carry_loader_state(state["loader"], self.loader, eng.rank))
        self.samples_seen = int(state["samples_seen"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        if self.control_pool:
            self.control_pool.load_states(state.get("control_pool"), eng.rank, eng.world_size)

    def export(self) -> Path:
        """Raw and EMA weights (full, fp32) as safetensors plus the resolved config as JSON: loadable in a
        single process whatever engine trained them (sharded parts are gathered to rank 0)."""
        out = self.run_dir / "export"
        eng = self.engine
        model = eng.full_model_state()
        emas = {std: eng.gather(self.ema.averaged(std)) for std in self.cfg.train.ema_stds}
        if eng.is_main:
            save_safetensors(model, out / "model.safetensors")
            for std, avg in emas.items():
                save_safetensors(avg, out / ema_filename(std))
            write_json({"config": to_dict(self.cfg), "vocab_sizes": self.vocab_sizes,
                        "samples_seen": self.samples_seen, "engine": eng.native_signature()}, out / "model.json")
            shutil.copy(self.data_dir / "manifest.json", out / "manifest.json")
        eng.barrier()
        return out

    # ---- one step --------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of one micro-batch. Override to change the objective."""
        cfg, dev = self.cfg, self.device
        x1, labels = self.modality.batch_to_flow(cfg, batch, gen, dev)  # data sample and label ids
        if self.control_pool is not None:  # Config A: a same-group control (modality transform) + noise
            x0 = self.control_pool.source(cfg, self.modality, batch, gen, dev).to(x1.dtype)
        else:
            x0 = torch.randn(x1.shape, generator=gen, device=dev)
            if cfg.flow.coupling == "ot":
                x0 = minibatch_ot(x0, x1)
        t = sample_time(x1.shape[0], cfg.flow.time_sampler, generator=gen, device=dev,
                        mean=cfg.flow.logit_mean, std=cfg.flow.logit_std)
        xt, target = self.path.sample(x0, x1, t)
        with self.engine.autocast():
            v = self.engine.forward_model(xt, t, labels)
        err = (v.float() - target).pow(2)
        if self.loss_mask is None:
            return err.mean()
        # Masked entries (an atlas cell's unmeasured genes) leave the loss: each sample's mean over its own
        # measured entries, then the batch mean (every cell weighs the same, whatever its dataset measures).
        m = self.loss_mask(batch, dev).reshape(err.shape).to(err.dtype)
        return ((err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)).mean()

    def train_step(self, it) -> dict:
        t_cfg, eng = self.cfg.train, self.engine
        seed = step_seed(t_cfg.seed, eng.rank, self.samples_seen)
        torch.manual_seed(seed)  # label dropout and projection dropout inside the model
        gen = torch.Generator(device=self.device).manual_seed(seed)
        timings = {"data": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
        total_loss = torch.zeros((), device=self.device)
        for _ in range(self.accum_steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            loss = self.compute_loss(batch, gen) / self.accum_steps
            t2 = time.perf_counter()
            eng.backward(loss)
            t3 = time.perf_counter()
            total_loss += loss.detach()
            timings["data"] += t1 - t0
            timings["forward"] += t2 - t1
            timings["backward"] += t3 - t2
        t0 = time.perf_counter()
        # The ranks' wishes to stop (a signal) and to log now (time rule) ride on the loss all-reduce: every rank
        # gets the same decision after the same step, without a collective of their own.
        wishes = torch.tensor([float(f) for f in self._flags], device=total_loss.device, dtype=total_loss.dtype)
        reduced = eng.all_reduce_mean(torch.cat([total_loss.reshape(1), wishes])).tolist()
        loss_value, stop, log_now = reduced[0], reduced[1] > 0, reduced[2] > 0
        grad_norm, stepped = eng.step(t_cfg.grad_clip)
        rolled_back = bool(getattr(eng, "rolled_back", False))  # the step made weights non-finite: undone
        stepped = stepped and np.isfinite(loss_value)
        self.samples_seen += t_cfg.batch_size
        if stepped:
            self.ema.update(self.engine.ema_view(), self.samples_seen, t_cfg.batch_size)
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
        timings["step"] = time.perf_counter() - t0
        return {"loss": loss_value, "grad_norm": grad_norm, "stepped": stepped, "rolled_back": rolled_back,
                "stop": stop, "log_now": log_now, **timings}

    # ---- the loop --------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train from wherever the run folder stands to train.total_samples, checkpoint, export; returns the
        export folder. A finished run only exports again (no step, no checkpoint write). The run folder's lock
        is released on return or failure."""
        try:
            return self._fit()
        finally:
            self.run_lock.release()

    def _fit(self) -> Path:
        t_cfg, eng = self.cfg.train, self.engine
        resumed = self.try_resume()
        if not resumed and t_cfg.init_from:  # a new run only: a resumed run's own checkpoint wins
            init_from_checkpoint(self)  # weights only (optimizer fresh, 0 samples); finetune.json
        cadence = Cadence(t_cfg)
        log = RunLog(self.run_dir, t_cfg.total_samples, self.samples_seen, eng.is_main, self.modality.sample_noun,
                     batch_size=t_cfg.batch_size, tensorboard=t_cfg.tensorboard,
                     progress_every_s=t_cfg.progress_every_s)
        if self.removed_temporaries:
            log.say(f"removed {len(self.removed_temporaries)} temporary file(s) of interrupted writes "
                    f"from {self.run_dir}")
        log.write({"event": "start", "resumed": resumed, "samples_seen": self.samples_seen,
                   "total_samples": t_cfg.total_samples, "batch_size": t_cfg.batch_size,
                   "removed_temporaries": len(self.removed_temporaries),
                   "device": str(self.device), "device_name": self.device_name,
                   "peak_tflops": self.peak_flops / 1e12 if self.peak_flops else None,
                   "engine": eng.name, "world_size": eng.world_size,
                   "params": self.engine.num_params(), **({"init_from": t_cfg.init_from} if t_cfg.init_from else {}),
                   **({"frozen_params": parameter_counts(self.model)["frozen"]} if t_cfg.trainable != "all" else {}),
                   "modality": self.modality.name, "train_flops_per_sample": self.flops_per_sample,
                   "log_every_samples": cadence.log_every, "ckpt_every_samples": cadence.ckpt_every,
                   "snapshot_every_samples": cadence.snapshot_every if cadence.snapshots else None})
        it = iter(self.loader)
        window = {"n": 0, "loss": 0.0, "grad_norm": 0.0, "data": 0.0, "forward": 0.0, "backward": 0.0,
                  "step": 0.0, "t0": time.perf_counter(), "samples": 0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.stop.install()
        try:
            while self.samples_seen < t_cfg.total_samples:
                before = self.samples_seen
                self._flags = (self.stop.local(), cadence.time_due())
                out = self.train_step(it)
                log.advance(t_cfg.batch_size)
                if not out["stepped"]:
                    log.write({"event": "nonfinite", "samples": self.samples_seen, "loss": out["loss"],
                               "grad_norm": out["grad_norm"], "in_row": self.nonfinite_in_row,
                               "weights": out["rolled_back"]})
                    if out["rolled_back"] or self.nonfinite_in_row >= t_cfg.max_nonfinite_steps:
                        diag = self.run_dir / "checkpoints" / "nonfinite-diagnostic.pt"
                        self.save(diag)
                        raise NonFiniteError(self._nonfinite_message(out, before, diag))
                else:
                    window["n"] += 1
                    window["loss"] += out["loss"]
                    window["grad_norm"] += out["grad_norm"]
                for k in ("data", "forward", "backward", "step"):
                    window[k] += out[k]
                window["samples"] += t_cfg.batch_size
                done = self.samples_seen >= t_cfg.total_samples
                if cadence.log_due(before, self.samples_seen, out["log_now"]) or done or out["stop"]:
                    self._log_window(log, window)
                    cadence.logged()
                if cadence.snapshot_due(before, self.samples_seen, done):
                    path = write_snapshot(self, t_cfg.snapshot_keep)
                    if path is not None:
                        log.write({"event": "snapshot", "samples": self.samples_seen, "path": str(path)})
                if out["stop"] and not done:
                    self._preempt(log)
                if cadence.ckpt_due(before, self.samples_seen) and not done:
                    self._save_logged(log)
        finally:
            self.stop.restore()
        if self.saved_samples != self.samples_seen:  # nothing new since the last complete checkpoint: no write
            self._save_logged(log)
        out_dir = self.export()
        log.write({"event": "end", "samples_seen": self.samples_seen, "export": str(out_dir),
                   "nonfinite_total": self.nonfinite_total})
        log.close()
        return out_dir

    def _save_logged(self, log: RunLog) -> None:
        """save() and a log record of how long it took (what a job's pre-limit signal margin must cover)."""
        t0 = time.perf_counter()
        self.save()
        log.write({"event": "checkpoint", "samples": self.samples_seen, "seconds": round(time.perf_counter() - t0, 3)})

    def _preempt(self, log: RunLog) -> None:
        """A stop was asked (SIGTERM / SIGUSR1 / the stop file) on some rank: every rank is here after the same
        step. Checkpoint (every rank its part), say so, and raise Preempted (exit code 75: requeue)."""
        if self.saved_samples != self.samples_seen:
            self._save_logged(log)
        why = self.stop.signal_name or "another rank"
        log.write({"event": "preempted", "samples": self.samples_seen, "reason": why,
                   "checkpoint": str(self.ckpt_path), "exit_code": Preempted.exit_code})
        if self.engine.is_main:
            self.stop.clear_file()
        log.close()
        raise Preempted(f"stopped by {why} at {self.samples_seen} samples (step "
                        f"{self.samples_seen // self.cfg.train.batch_size}) after writing the checkpoint "
                        f"{self.ckpt_path}; rerun the same command to resume (exit code {Preempted.exit_code}: "
                        f"requeue)")

    def _nonfinite_message(self, out: dict, before: int, diag: Path) -> str:
        if out["rolled_back"]:
            lr = self.engine.optimizer.param_groups[0].get("lr")
            return (f"the optimizer step from {before} to {self.samples_seen} samples (step "
                    f"{self.samples_seen // self.cfg.train.batch_size}) made the weights non-finite with a finite "
                    f"gradient (loss {out['loss']}, grad norm {out['grad_norm']}, lr {lr}); the weights were "
                    f"restored to those before it; diagnostic checkpoint (those weights) in {diag}")
        return (f"{self.nonfinite_in_row} non-finite steps in a row at {self.samples_seen} samples "
                f"(loss {out['loss']}, grad norm {out['grad_norm']}); diagnostic checkpoint in {diag}")

    def _log_window(self, log: RunLog, w: dict) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - w["t0"]
        ips = w["samples"] / max(elapsed, 1e-9)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0
        peak_max = self.engine.all_reduce_max(peak)  # collective: every rank takes part
        n = max(w["n"], 1)
        per_rank = ips / self.engine.world_size
        record = {"event": "train", "step": self.samples_seen // self.cfg.train.batch_size,
                  "samples": self.samples_seen, "loss": w["loss"] / n,
                  "grad_norm": w["grad_norm"] / n, "images_per_s": ips, "images_per_s_per_rank": per_rank}
        if self.peak_flops and self.flops_per_sample:  # a known peak (devices.py or train.peak_tflops)
            record["mfu"] = per_rank * self.flops_per_sample / self.peak_flops
        if cuda:
            record.update(peak_mem_gb=peak, peak_mem_gb_max_rank=peak_max)
        eta = log.eta_s()
        record.update({"time_data": w["data"], "time_forward": w["forward"], "time_backward": w["backward"],
                       "time_step": w["step"], "time_total": elapsed, "eta_s": round(eta, 1) if eta is not None else None,
                       "skipped_samples": self.loader.skipped})
        log.write(record)
        w.update({"n": 0, "loss": 0.0, "grad_norm": 0.0, "data": 0.0, "forward": 0.0, "backward": 0.0,
                  "step": 0.0, "t0": time.perf_counter(), "samples": 0})


def train(cfg: Config) -> Path:
    """Train (or resume) the run described by cfg; returns the export folder."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.run_lock.release()
        trainer.engine.close()
