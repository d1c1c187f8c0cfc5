"""One run per run folder (phenoflow/train/run_folder.py): a second `phenoflow train` on a folder a live run holds
fails at once, naming the holder's pid and host, before writing anything; under torchrun every rank stops;
once the holder is SIGKILLed a rerun succeeds. Forked children do not keep the lock. Temporary files of killed
writes are removed at start (under the lock) and the run resumes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_worker as TW
from test_engine_equivalence import REPO, free_port, torchrun_env

from phenoflow.train.run_folder import RunLock, RunLockedError

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def train_cmd(out: Path, name: str, total: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "phenoflow.cli", "train", "--preset", "demo", *TW.TINY,
            f"train.total_samples={total}", f"run.out_dir={out}", f"run.name={name}", *extra]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, "the first run ended early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_second_run_fails_fast_naming_the_holder_then_reruns_after_kill(tmp_path):
    run = tmp_path / "r"
    first = subprocess.Popen(train_cmd(tmp_path, "r", 10**7), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
    try:
        # The first run is training (its start event is logged): it holds the lock.
        wait_for(lambda: (run / "log.jsonl").is_file() and "start" in (run / "log.jsonl").read_text(), first)
        config_stat = (run / "config.yaml").stat().st_mtime_ns
        t0 = time.time()
        second = subprocess.run(train_cmd(tmp_path, "r", 32), capture_output=True, text=True, env=ENV, cwd=REPO,
                                timeout=120, check=False)
        elapsed = time.time() - t0
        assert second.returncode != 0
        text = second.stdout + second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in text, text[-3000:]
        assert "in use by another run" in text
        assert elapsed < 60, elapsed  # no data, no model: it stops at start-up
        assert (run / "config.yaml").stat().st_mtime_ns == config_stat, "the refused run wrote config.yaml"
        assert [e["event"] for e in events(run)].count("start") == 1
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = subprocess.run(train_cmd(tmp_path, "r", 32), capture_output=True, text=True, env=ENV, cwd=REPO,
                           timeout=240, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [e["event"] for e in events(run)].count("end") == 1
    assert json.loads((run / ".lock").read_text())["pid"] != first.pid


@pytest.mark.slow
def test_every_rank_stops_under_torchrun(tmp_path):
    run = tmp_path / "r"
    holder = RunLock(run)
    holder.acquire()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "phenoflow.cli", "train", "--preset", "demo", *TW.TINY,
               "train.engine=ddp", "train.total_samples=32", f"run.out_dir={tmp_path}", "run.name=r"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=torchrun_env(), cwd=REPO, timeout=180,
                              check=False)
    finally:
        holder.release()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"pid {os.getpid()} on host") >= 2, text[-4000:]  # both ranks name the holder
    assert sorted(p.name for p in run.iterdir()) == [".lock"], "a refused rank wrote into the run folder"


def test_the_lock_is_exclusive_and_not_kept_by_forked_children(tmp_path):
    a, b = RunLock(tmp_path / "r"), RunLock(tmp_path / "r")
    a.acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
        b.acquire()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a DataLoader worker, say: it must not hold the lock on its own
        os.write(w, b"up")  # after the fork hooks ran
        time.sleep(5)
        os._exit(0)
    os.read(r, 2)
    try:
        a.release()
        b.acquire()  # the parent's release freed it although the child still runs
        assert json.loads((tmp_path / "r" / ".lock").read_text())["pid"] == os.getpid()
    finally:
        b.release()
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_trainer_holds_the_lock_while_it_runs(tmp_path):
    cfg = TW.config(tmp_path, "held", "single", 0, 32)
    tr = TW.trainer(cfg)
    seen = []
    step = tr.train_step

    def probe(it):
        try:
            RunLock(cfg.run_dir).acquire()
            seen.append("free")
        except RunLockedError:
            seen.append("held")
        return step(it)

    tr.train_step = probe
    tr.fit()
    assert seen == ["held", "held"]
    RunLock(cfg.run_dir).acquire()  # released when fit returns


def test_temporaries_of_killed_writes_are_removed_and_the_run_resumes(tmp_path):
    cfg = TW.config(tmp_path, "tmp", "single", 0, TW.HALF)
    TW.trainer(cfg).fit()
    run = cfg.run_dir
    planted = [run / "checkpoints" / ".latest.pt.tmp123456", run / "data" / ".train-000001.tar.tmp4242",
               run / "data" / ".train-000001.idx.tmp4242", run / ".vocab.json.tmp77", run / "config.yaml.tmp",
               run / "export" / ".model.safetensors.tmp99", run / "data" / "vocab.json.tmp31337"]
    kept = [run / "notes.txt", run / "report" / "metrics.md.tmp", run / "checkpoints" / "tmp-notes"]
    for p in planted + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    n = len(events(run))
    cfg2 = TW.config(tmp_path, "tmp", "single", 0, TW.TOTAL)
    TW.trainer(cfg2).fit()
    assert not [p for p in planted if p.exists()]
    assert all(p.exists() for p in kept)
    start = events(run)[n]
    assert start["event"] == "start" and start["resumed"] and start["samples_seen"] == TW.HALF
    assert start["removed_temporaries"] == len(planted)
    assert events(run)[-1]["event"] == "end" and events(run)[-1]["samples_seen"] == TW.TOTAL
    assert all(torch.isfinite(t).all() for t in torch.load(run / "checkpoints" / "latest.pt",
                                                             weights_only=True)["model"].values())
