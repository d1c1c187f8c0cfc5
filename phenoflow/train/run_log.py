"""What a run tells its user while it trains (rank 0): log.jsonl, status lines, progress, TensorBoard.

    run_dir/log.jsonl      one JSON record per event (start, train, nonfinite, snapshot, preempted, end)
    run_dir/tensorboard/   event files (torch.utils.tensorboard): loss, grad norm, throughput, MFU, memory,
                           step-time breakdown; evaluation metrics and sample grids (phenoflow/eval/sweep.py)
    stderr                 a status line per train record; a progress bar on a terminal, else (SLURM logs) a
                           plain-text progress line with ETA every train.progress_every_s seconds

Intervals (`Cadence`): train.{log,ckpt,snapshot}_every_{samples,steps}; when neither of a pair is set the
interval scales with the run: a log line every ~1% of the run, a checkpoint at ~10 points, a snapshot at ~20
points. With the automatic log interval the first step of a process is logged (its time includes start-up and
compilation), and a line also comes whenever a minute has passed since the last one during the first ten
minutes of a process.
MFU is reported against the device's dense bf16 peak (phenoflow/train/devices.py) and omitted when unknown;
memory only on CUDA.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

AUTO_POINTS = {"log": 100, "ckpt": 10, "snapshot": 20}
WARMUP_S, WARMUP_EVERY_S = 600.0, 60.0  # automatic log interval: a line at least once a minute at the start


def interval_samples(t_cfg, what: str) -> tuple[int, bool]:
    """(interval in samples, automatic?) of `what` in log | ckpt | snapshot, from train.<what>_every_samples /
    _steps, else scaled to the run (AUTO_POINTS points over train.total_samples)."""
    bs = int(t_cfg.batch_size)
    samples, steps = int(getattr(t_cfg, f"{what}_every_samples")), int(getattr(t_cfg, f"{what}_every_steps"))
    if samples:
        return samples, False
    if steps:
        return steps * bs, False
    total_steps = math.ceil(int(t_cfg.total_samples) / bs)
    return max(1, round(total_steps / AUTO_POINTS[what])) * bs, True


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a step from `before` to `after` samples crossed a multiple of `every`."""
    return before // every != after // every


class Cadence:
    """When to log, checkpoint and snapshot; every rank holds one and reaches the same decisions (the time
    rule's wish is combined over ranks by the trainer before it is acted on)."""

    def __init__(self, t_cfg):
        self.log_every, self.log_auto = interval_samples(t_cfg, "log")
        self.ckpt_every, _ = interval_samples(t_cfg, "ckpt")
        self.snapshot_every, _ = interval_samples(t_cfg, "snapshot")
        self.snapshots = bool(t_cfg.snapshots)
        self.t_start = self.t_last = time.monotonic()
        self.first = True  # no line yet in this process

    def time_due(self) -> bool:
        """This rank's wish for an extra log line (automatic interval, first minutes, a minute since the last)."""
        now = time.monotonic()
        return self.log_auto and now - self.t_start < WARMUP_S and now - self.t_last >= WARMUP_EVERY_S

    def log_due(self, before: int, after: int, time_wish: bool) -> bool:
        return crossed(before, after, self.log_every) or time_wish or (self.log_auto and self.first)

    def logged(self) -> None:
        self.t_last = time.monotonic()
        self.first = False

    def ckpt_due(self, before: int, after: int) -> bool:
        return crossed(before, after, self.ckpt_every)

    def snapshot_due(self, before: int, after: int, done: bool) -> bool:
        return self.snapshots and (crossed(before, after, self.snapshot_every) or done)


def fmt_duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


class _TensorBoard:
    """A SummaryWriter in run_dir/tensorboard, or nothing (said once) when the package is missing."""

    warned = False

    def __init__(self, folder: Path, enabled: bool, say):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder))
        except ImportError as e:
            if not _TensorBoard.warned:
                say(f"tensorboard is not installed ({e}): no event files are written, log.jsonl has everything "
                    f"(pip install tensorboard, or train.tensorboard=false to silence this)")
                _TensorBoard.warned = True

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.writer.add_scalar(tag, float(v), step)

    def image(self, tag: str, chw, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, chw, step, dataformats="HWC" if chw.shape[-1] in (3, 4) else "CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


TB_TRAIN = {"loss": "train/loss", "grad_norm": "train/grad_norm", "images_per_s": "perf/samples_per_s",
            "images_per_s_per_rank": "perf/samples_per_s_per_rank", "mfu": "perf/mfu",
            "peak_mem_gb": "perf/peak_mem_gb", "peak_mem_gb_max_rank": "perf/peak_mem_gb_max_rank",
            "time_data": "time/data_s", "time_forward": "time/forward_s", "time_backward": "time/backward_s",
            "time_step": "time/optimizer_s", "time_total": "time/window_s", "skipped_samples": "data/skipped"}


class RunLog:
    """Rank-0 logging: a status line per train record, JSON lines in run_dir/log.jsonl, a progress bar on a
    terminal or a periodic progress line elsewhere, TensorBoard event files. Other ranks: no-ops."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool, noun: str = "img",
                 batch_size: int = 1, tensorboard: bool = False, progress_every_s: float = 60.0):
        self.enabled, self.noun = enabled, noun
        self.path = Path(run_dir) / "log.jsonl"
        self.total, self.start, self.batch = int(total), int(start), max(1, int(batch_size))
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, unit=noun, dynamic_ncols=True, disable=not enabled or not self.tty,
                        mininterval=2.0)
        self.t0 = self.t_progress = time.monotonic()
        self.progress_every_s = float(progress_every_s)
        self.samples = int(start)
        self.tb = _TensorBoard(Path(run_dir) / "tensorboard", enabled and tensorboard, self.say)

    def say(self, text: str) -> None:
        """A line on stderr (rank 0), above the progress bar if there is one."""
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    # ---- progress and ETA --------------------------------------------------------------------------------
    def eta_s(self) -> float | None:
        """Seconds to total_samples at this process's mean rate so far (None before the first step)."""
        done = self.samples - self.start
        elapsed = time.monotonic() - self.t0
        if done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.samples) / (done / elapsed)

    def position(self) -> str:
        step, steps = self.samples // self.batch, math.ceil(self.total / self.batch)
        eta = self.eta_s()
        return (f"step {step:,}/{steps:,}  {self.samples:,}/{self.total:,} {self.noun} "
                f"({100 * self.samples / max(self.total, 1):.1f}%)  ETA {fmt_duration(eta) if eta is not None else '?'}")

    def advance(self, n: int) -> None:
        self.samples += int(n)
        self.bar.update(n)
        if self.enabled and not self.tty and self.progress_every_s > 0:
            now = time.monotonic()
            if now - self.t_progress >= self.progress_every_s:
                self.t_progress = now
                rate = (self.samples - self.start) / max(now - self.t0, 1e-9)
                print(f"[progress] {self.position()}  {rate:.1f} {self.noun}/s", file=sys.stderr, flush=True)

    # ---- records ---------------------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("event") == "train":
            self.say(self.status_line(record))
            step = int(record["samples"])
            self.tb.scalars({tag: record.get(k) for k, tag in TB_TRAIN.items() if k in record}, step)
            self.tb.flush()
        elif record.get("event") == "checkpoint":
            self.say(f"checkpoint at {record['samples']:,} {self.noun} ({record['seconds']:.1f} s)")
        elif record.get("event") != "snapshot":  # snapshots: log.jsonl only
            self.say(json.dumps(record))

    def status_line(self, r: dict[str, Any]) -> str:
        """One line for people: position and ETA, loss, throughput; MFU and memory only where they mean
        something (a known peak; CUDA)."""
        parts = [f"[{self.position()}]", f"loss {r['loss']:.4f}", f"grad {r['grad_norm']:.3f}",
                 f"{r['images_per_s']:.1f} {self.noun}/s"]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r.get("peak_mem_gb") is not None:
            parts.append(f"mem {r['peak_mem_gb']:.1f} GB")
        parts.append(f"(data {r['time_data']:.2f}s fwd {r['time_forward']:.2f}s bwd {r['time_backward']:.2f}s"
                     f" opt {r['time_step']:.2f}s)")
        return "  ".join(parts)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()


def log_eval_to_tensorboard(run_dir: str | Path, step: int, scalars: dict[str, float],
                            images: dict[str, Any] | None = None) -> bool:
    """Evaluation results into the run's TensorBoard folder (scalars by tag; images: tag -> HWC uint8 array or
    a PNG path). False (said once) if tensorboard is missing."""
    tb = _TensorBoard(Path(run_dir) / "tensorboard", True, lambda s: print(s, file=sys.stderr))
    if tb.writer is None:
        return False
    tb.scalars(scalars, step)
    for tag, img in (images or {}).items():
        if isinstance(img, (str, Path)):
            import numpy as np
            from PIL import Image

            img = np.asarray(Image.open(img).convert("RGB"))
        tb.image(tag, img, step)
    tb.close()
    return True
