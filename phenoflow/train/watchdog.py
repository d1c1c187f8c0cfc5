"""Peer liveness for multi-process runs: a dead or frozen rank stops the whole job within a bounded time.

Without it, a rank that dies (SIGKILL, OOM killer, a lost node) can leave the other ranks blocked in a collective
until the backend's timeout (30 min for gloo, 10 min for NCCL) - hours of a 32-GPU job when it happens in a
checkpoint barrier. gloo often notices a peer's closed sockets at once, NCCL usually does not, and a rank that
is frozen rather than dead closes nothing.

Every rank runs a daemon thread that, each `interval` seconds, bumps its own counter in the launcher's c10d
store (MASTER_ADDR:MASTER_PORT: torchrun's agent store on the first node, or the store rank 0 hosts) and reads
every other rank's counter. A rank whose counter has not moved for `timeout_s` seconds (measured on the
reader's own monotonic clock, so node clocks need not agree) is dead or frozen; a rank that is still running
`timeout_s` after a peer exited is stuck waiting for it; an unreachable store means the node hosting it is gone.
In each case the thread prints one line naming the failed rank and its node (host, local rank, pid) and ends
its own process with `os._exit(EXIT_PEER_LOST)` - the only way to release a thread blocked in a C++
collective. The launcher (torchrun) sees a failed worker, stops the others on its node and exits; every
node does the same, so the job ends within `timeout_s` + 2 intervals + the launcher's reaction (see
docs/distributed.md, "Failure detection"). Rerunning the same command resumes from the last checkpoint.

Cost: one store round trip per peer and interval (32 ranks at 2 s: ~500 small requests/s on the store).
`train.peer_timeout_s=0` turns it off; `train.collective_timeout_s` is the process group's timeout, the bound
for a rank that is alive (its thread answers) but never reaches a collective.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

EXIT_PEER_LOST = 70  # EX_SOFTWARE: a peer rank died or hung; not a requeue code (75)
PREFIX = "phenoflow/watchdog"
_GENERATION = 0


def node_rank() -> int:
    """This process's node index from the launcher's environment (torchrun GROUP_RANK, SLURM_NODEID, ...)."""
    for key in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID", "CROSS_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    rank = int(os.environ.get("RANK", "0"))
    return rank // local_world if local_world > 0 else 0


def describe_self(rank: int) -> str:
    return (f"rank {rank} (node {node_rank()}, host {socket.gethostname()}, local rank "
            f"{os.environ.get('LOCAL_RANK', '0')}, pid {os.getpid()})")


class Watchdog:
    def __init__(self, rank: int, world: int, timeout_s: float, host: str, port: int,
                 interval_s: float | None = None):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.interval_s = interval_s or min(max(self.timeout_s / 10, 0.5), 2.0)
        self.host, self.port = host, port
        global _GENERATION
        _GENERATION += 1  # a process group made again in the same processes: fresh keys
        run = os.environ.get("TORCHELASTIC_RUN_ID", "") + "/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{PREFIX}/{run}/{_GENERATION}/"
        self.me = describe_self(rank)
        self.pid = os.getpid()  # forked children (data loader workers) inherit the handler: not theirs
        self._stop = threading.Event()  # ends the thread
        self._left = False  # this rank's exit mark is written
        self._thread: threading.Thread | None = None
        self.store = None

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}{kind}/{rank}"

    def start(self) -> Watchdog:
        import torch.distributed as dist

        self.store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                   timeout=timedelta(seconds=max(10.0, 2 * self.interval_s)))
        self.store.set(self._key("who", self.rank), self.me)
        self.store.add(self._key("hb", self.rank), 1)
        self._thread = threading.Thread(target=self._run, name="phenoflow-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        with contextlib.suppress(ValueError):  # not the main thread: no handler (the launcher's SIGTERM kills)
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame) -> None:
        """SIGTERM outside the training loop (whose handler turns it into a checkpoint request): the launcher
        is stopping this rank because another failed. Say so in the store (peers naming the dead rank leave
        this one out), then die of the signal as before."""
        if os.getpid() == self.pid and not self._left:
            self._left = True
            self._stop.set()
            with contextlib.suppress(Exception):
                self.store.add(self._key("exit", self.rank), 3)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def stop(self, failed: bool = False) -> None:
        """This rank leaves (close() or interpreter exit): peers stop watching its heartbeat. After a failure
        (an exception other than a requeue), a peer still running `timeout_s` later is stuck waiting for this
        rank and ends itself."""
        if self._thread is None or self._left or os.getpid() != self.pid:
            return
        self._left = True
        self._stop.set()
        with contextlib.suppress(Exception):  # the store's node may be gone already; nothing to tell then
            self.store.add(self._key("exit", self.rank), 2 if failed else 1)

    def diagnose(self, exc: BaseException) -> str | None:
        """After a failed collective on this rank: which peers are dead? Watches every counter for 3 intervals
        (bumping its own, so that peers diagnosing at the same time do not suspect this rank) and names the
        peers whose counter did not move and that did not exit; prints and returns the line (None: none)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 10)
        peers = [r for r in range(self.world) if r != self.rank]
        try:
            first = {r: self.store.add(self._key("hb", r), 0) for r in peers}
            for _ in range(3):
                time.sleep(self.interval_s)
                self.store.add(self._key("hb", self.rank), 1)
            dead = [r for r in peers if self.store.add(self._key("hb", r), 0) == first[r]
                    and not self.store.add(self._key("exit", r), 0)]
            failed = [r for r in peers if self.store.add(self._key("exit", r), 0) == 2]
        except Exception as e:  # noqa: BLE001
            line = (f"phenoflow watchdog: {self.me}: a collective failed ({_first_line(exc)}) and the launcher's "
                    f"store {self.host}:{self.port} is unreachable ({type(e).__name__}): the node hosting it (node "
                    "0's launcher or rank 0) has died")
        else:
            if not dead and not failed:
                return None
            parts = []
            if dead:
                parts.append(f"{'; '.join(self._who(r) for r in dead)} stopped answering: it died (killed, out of "
                             "memory, or its node failed)")
            if failed:
                parts.append(f"{'; '.join(self._who(r) for r in failed)} exited with an error (see its output)")
            line = (f"phenoflow watchdog: {self.me}: a collective failed ({_first_line(exc)}); "
                    + "; ".join(parts))
        line += ". Rerun the same command to resume from the last checkpoint."
        sys.stderr.write("\n" + line + "\n")
        sys.stderr.flush()
        return line

    def _who(self, rank: int) -> str:
        with contextlib.suppress(Exception):
            if self.store.check([self._key("who", rank)]):
                return self.store.get(self._key("who", rank)).decode()
        return f"rank {rank}"

    def _fail(self, why: str) -> None:
        if self._stop.is_set():
            return
        sys.stderr.write(f"\nphenoflow watchdog: {why}; stopping {self.me} (exit {EXIT_PEER_LOST}). The launcher "
                         "stops the job; rerun the same command to resume from the last checkpoint.\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)

    def _run(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank]
        start = time.monotonic()
        seen: dict[int, tuple[int, float]] = {r: (0, start) for r in peers}
        exited: dict[int, float] = {}
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(self._key("hb", self.rank), 1)
                beats = {r: self.store.add(self._key("hb", r), 0) for r in peers}
                marks = {r: self.store.add(self._key("exit", r), 0) for r in peers if r not in exited}
            except Exception as e:  # noqa: BLE001 - any store failure means its host is gone
                if self._stop.is_set():
                    return
                self._fail(f"the launcher's store {self.host}:{self.port} is unreachable ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}): the node hosting it (node 0's launcher or "
                           "rank 0) has died")
                return
            now = time.monotonic()
            for r, m in marks.items():
                if m:
                    exited[r] = now if m == 2 else float("inf")  # 1 normal exit, 3 stopped by its launcher
            for r in peers:
                if beats[r] != seen[r][0]:
                    seen[r] = (beats[r], now)
            stale = [r for r in peers if r not in exited and now - seen[r][1] > self.timeout_s]
            if stale:
                names = "; ".join(self._who(r) for r in stale)
                self._fail(f"no heartbeat for {now - seen[stale[0]][1]:.1f} s (train.peer_timeout_s="
                           f"{self.timeout_s:g}) from {names}: it died or hung")
                return
            late = [r for r, t in exited.items() if t != float("inf") and now - t > self.timeout_s]
            if late:
                self._fail(f"{'; '.join(self._who(r) for r in late)} exited {now - exited[late[0]]:.1f} s ago and "
                           "this rank is still running (blocked in a collective it will not join)")
                return


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def is_collective_failure(exc: BaseException | None) -> bool:
    """A backend error from a collective (a peer's closed connection, a timeout), as opposed to this rank's own."""
    import torch.distributed as dist

    if exc is None:
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "Connection reset",
                                                                    "Connection closed", "Broken pipe", "timed out"))


_ACTIVE: Watchdog | None = None


def start_watchdog(rank: int, world: int, timeout_s: float) -> Watchdog | None:
    """One per process (the first distributed engine starts it); None when off, alone, or without a store
    address (MASTER_ADDR / MASTER_PORT)."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if timeout_s <= 0 or world <= 1 or not host or not port:
        return None
    _ACTIVE = Watchdog(rank, world, timeout_s, host, int(port)).start()
    return _ACTIVE


def stop_watchdog(exc: BaseException | None = None) -> None:
    """This rank leaves. `exc`: the exception it leaves with (None: a normal end); after a failed collective the
    dead peers are named first (Watchdog.diagnose)."""
    global _ACTIVE
    if _ACTIVE is not None:
        if is_collective_failure(exc):
            _ACTIVE.diagnose(exc)
        _ACTIVE.stop(exc is not None and getattr(exc, "exit_code", None) != 75)
        _ACTIVE = None
