"""Stopping a run cleanly when the cluster asks: SIGTERM, SIGUSR1, or a stop file.

While `Trainer.fit` runs, SIGTERM and SIGUSR1 only set a flag (`StopRequest`); rank 0 also looks for the file
run_dir/STOP every few seconds. The flag of every rank is combined with the step's loss all-reduce (no extra
collective), so all ranks see the request after the same step: each finishes that step, the checkpoint is
written (every rank its native files, rank 0 latest.pt), and every rank raises `Preempted`, whose exit code
75 (EX_TEMPFAIL, "try again") tells a job script to requeue. Rerunning the same command resumes exactly
(scripts/slurm_32xh100.sbatch does it).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from phenoflow.errors import PhenoflowError

EXIT_REQUEUE = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
STOP_FILE = "STOP"
STOP_FILE_POLL_S = 5.0


class Preempted(PhenoflowError):
    """The run stopped on request after writing a checkpoint; rerun the same command to resume."""

    exit_code = EXIT_REQUEUE


class StopRequest:
    """Signal handlers (main thread only) and the stop file; `local()` is this rank's wish to stop."""

    def __init__(self, run_dir: Path, watch_file: bool):
        self.signal_name: str | None = None
        self.stop_file = Path(run_dir) / STOP_FILE
        self.watch_file = watch_file
        self._t_poll = 0.0
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> StopRequest:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker thread): signals are not ours
                pass
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()

    def local(self) -> bool:
        if self.signal_name is not None:
            return True
        if self.watch_file:
            now = time.monotonic()
            if now - self._t_poll >= STOP_FILE_POLL_S:
                self._t_poll = now
                if self.stop_file.exists():
                    self.signal_name = f"stop file {self.stop_file}"
                    return True
        return False

    def clear_file(self) -> None:
        """Remove the stop file once honoured (rank 0), so that the requeued run does not stop at once."""
        try:
            os.unlink(self.stop_file)
        except FileNotFoundError:
            pass
