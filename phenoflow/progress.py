"""Progress of long loops for people: a tqdm bar on a terminal, plain periodic lines elsewhere (SLURM logs, pipes).

``Progress(total, desc, unit)`` is used as a context manager; ``update(n)`` advances it. On a terminal (stderr is
a TTY) it is a tqdm bar. Otherwise it prints ``[desc] 120/480 images (25.0%)  31.2 images/s  ETA 12s`` to
stderr when it starts, every ``every_s`` seconds (default 30; environment PHENOFLOW_PROGRESS_S overrides it, 0
prints every update) and once at the end, so a log file shows that the command is alive and how long it needs.
``enabled=False`` prints nothing.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any


def fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float | None = None, enabled: bool = True,
                 tty: bool | None = None):
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        env = os.environ.get("PHENOFLOW_PROGRESS_S")
        self.every_s = float(env) if env not in (None, "") else (30.0 if every_s is None else float(every_s))
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.n = 0
        self.t0 = self.t_last = time.monotonic()
        self.bar: Any = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, leave=True)
        elif enabled:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        pct = f" ({100 * self.n / self.total:.1f}%)" if self.total else ""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        tail = ""
        if self.n and self.total:
            tail = f"  {rate:.1f} {self.unit}/s  " + (f"ETA {fmt_seconds((self.total - self.n) / rate)}"
                                                      if self.n < self.total else f"done in {fmt_seconds(elapsed)}")
        print(f"[{self.desc}] {self.n:,}/{self.total:,} {self.unit}{pct}{tail}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.t_last >= self.every_s and self.n < self.total:
            self.t_last = now
            self._line()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.n >= self.total:
            self._line()

    def __enter__(self) -> Progress:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
