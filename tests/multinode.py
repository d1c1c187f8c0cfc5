"""Simulated multi-node jobs on one machine (used by tests/test_multinode.py and tests/test_slurm_script.py).

`Cluster` starts one `torchrun` per "node" (`--nnodes N --node-rank i`, c10d rendezvous on 127.0.0.1 at a free
port, gloo), each in its own process group (so a whole node - launcher and workers - can be killed at once),
with its own node-local scratch folder (TMPDIR, the torch.compile / Triton caches: what a cluster node keeps on
local disk) while the run folder is shared (every rank writes native checkpoint files there; rank 0 writes the
synthetic data that every node reads). Run as a script under such a launch it is also the worker of the
parity test (`python tests/multinode.py parity OUT SPECS`): the loader's exactly-once property over ranks of
different nodes, then tests/engine_worker.py's engine-vs-single-process comparison at world size 4.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_equivalence import REPO, free_port, torchrun_env

TINY = ["model.prediction=velocity", "flow.time_sampler=uniform", "data.image_size=16", "data.channels=3", "data.train_images=256", "data.val_images=32",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2",
        "model.size=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "train.batch_size=16", "train.micro_batch_size=4", "train.lr=1e-3", "train.precision=fp32",
        "train.device=cpu", "train.log_every_samples=16", "train.ckpt_every_samples=32", "train.snapshots=false",
        "train.tensorboard=false"]  # tests/trainer_worker.py's tiny run (4 ranks x micro-batch 4 = batch 16)
NODE_LOCAL = ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def node_env(root: Path, node: int, extra: dict | None = None) -> dict:
    """The environment of one simulated node: shared settings plus node-local scratch folders."""
    scratch = root / f"node{node}-local"
    env = torchrun_env()
    for i, key in enumerate(NODE_LOCAL):
        (scratch / key.lower()).mkdir(parents=True, exist_ok=True)
        env[key] = str(scratch / key.lower())
    env.update(PHENOFLOW_TEST_NODE=str(node), PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def train_cmd(out: Path, name: str, *overrides: str) -> list[str]:
    """`phenoflow train` of the tiny run (arguments after the launcher's)."""
    return ["-m", "phenoflow.cli", "train", "--preset", "demo", *TINY, f"run.out_dir={out}", f"run.name={name}",
            *overrides]


class Cluster:
    """`nnodes` torchrun launchers on this machine (one per simulated node), `nproc` workers each."""

    def __init__(self, root: Path, nnodes: int = 2, nproc: int = 2, env: dict | None = None,
                 monitor_interval: float = 0.5):
        self.root, self.nnodes, self.nproc = Path(root), nnodes, nproc
        self.env, self.monitor_interval = env or {}, monitor_interval
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.t_end: list[float | None] = []

    def launcher(self, node: int, port: int, job: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}", f"--node-rank={node}",
                f"--nproc-per-node={self.nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id={job}", f"--monitor-interval={self.monitor_interval}", "--max-restarts=0"]

    def start(self, target: list[str], tag: str = "job") -> Cluster:
        """Launch `target` (a script path and its arguments, or ["-m", module, ...]) on every node; node 0
        first (its launcher hosts the c10d store)."""
        port = free_port()
        self.procs, self.logs, self.t_end = [], [], []
        for node in range(self.nnodes):
            log = self.root / f"{tag}-node{node}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(self.launcher(node, port, tag) + target, cwd=REPO,
                                                   env=node_env(self.root, node, self.env), stdout=f,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            self.t_end.append(None)
            time.sleep(0.5)
        return self

    def poll(self) -> list[int | None]:
        codes = [p.poll() for p in self.procs]
        for i, c in enumerate(codes):
            if c is not None and self.t_end[i] is None:
                self.t_end[i] = time.monotonic()
        return codes

    def wait(self, timeout: float) -> list[int]:
        """Wait for every launcher; on timeout kill every node and fail with the logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c is not None for c in self.poll()):
                return [p.returncode for p in self.procs]
            time.sleep(0.1)
        self.kill_all()
        raise AssertionError(f"the simulated job did not end within {timeout} s:\n{self.output()[-6000:]}")

    def run(self, target: list[str], tag: str = "job", timeout: float = 600) -> str:
        """Launch, wait, require every launcher to exit 0; returns the output of every node."""
        codes = self.start(target, tag).wait(timeout)
        assert codes == [0] * self.nnodes, f"launchers exited {codes}:\n{self.output()[-8000:]}"
        return self.output()

    def output(self) -> str:
        return "".join(f"===== node {i} =====\n{log.read_text(errors='replace')}" for i, log in enumerate(self.logs)
                       if log.exists())

    def kill_node(self, node: int) -> None:
        """SIGKILL a whole node: its launcher and every process under it (torchrun starts each worker in a
        session of its own, so the launcher's process group is not enough)."""
        for pid in [self.procs[node].pid, *descendants(self.procs[node].pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        for node in range(len(self.procs)):
            self.kill_node(node)
        for p in self.procs:
            p.wait()

    def workers(self, node: int) -> dict[int, int]:
        """{global rank: pid} of a node's workers (the launcher's children)."""
        out = {}
        for pid in _children().get(self.procs[node].pid, []):
            rank = process_env(pid).get("RANK")
            if rank is not None:
                out[int(rank)] = pid
        return out

    def live(self) -> list[int]:
        """Processes of the job still alive (launchers and everything under them; zombies excluded)."""
        roots = [p.pid for p in self.procs]
        return [pid for pid in roots + [d for r in roots for d in descendants(r)] if _alive(pid)]


def process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---- worker side (under the simulated launch) ---------------------------------------------------------------
def placement() -> dict:
    return {"rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
            "group_rank": int(os.environ.get("GROUP_RANK", "-1")), "node": int(os.environ["PHENOFLOW_TEST_NODE"]),
            "tmpdir": os.environ.get("TMPDIR"), "pid": os.getpid()}


def keys_once(out: Path, rank: int, world: int) -> list[str]:
    """Rank 0 writes synthetic shards into the shared folder; every rank reads one epoch of its part."""
    import torch.distributed as dist

    from phenoflow.data.loader import ShardLoader
    from phenoflow.data.prepare import write_synthetic
    from phenoflow.data.synthetic import SyntheticSpec

    shards = out / "shards"
    if rank == 0:
        write_synthetic(SyntheticSpec(image_size=16, channels=3, num_perturbations=2, num_experiments=1), shards,
                        {"train": 53}, samples_per_shard=6)
    dist.barrier()
    loader = ShardLoader(shards, "train", 4, rank=rank, world_size=world, num_workers=1, seed=7, shuffle=True,
                         drop_last=False, infinite=False, shuffle_buffer=5)
    return [k for b in loader for k in b["key"]]


def parity_main(out: Path, specs: str) -> None:
    import engine_worker as W
    import torch.distributed as dist

    from phenoflow.train.engines import init_distributed

    rank, world, _, _ = init_distributed(W.tiny_cfg("ddp"))
    rec = {"placement": placement(), "keys": keys_once(out, rank, world)}
    gathered = [None] * world
    dist.all_gather_object(gathered, rec)
    results, refs = {"ranks": gathered}, {}
    for spec in specs.split(","):
        name, stage, *prec = spec.split(":")
        precision = prec[0] if prec else "fp32"
        if precision not in refs:
            refs[precision] = W.reference(precision)
            results["reference" if precision == "fp32" else f"reference:{precision}"] = refs[precision][0]
        results[spec] = W.run_engine(name, int(stage), out, refs[precision][1], precision)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "parity":
        parity_main(Path(sys.argv[2]), sys.argv[3])
