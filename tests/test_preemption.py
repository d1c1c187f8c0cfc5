"""SIGTERM / SIGUSR1 / the stop file: the trainer finishes the step, checkpoints on every rank, exits 75
(requeue), and a rerun equals an uninterrupted run (phenoflow/train/preemption.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import preemption_worker as PW
from test_engine_equivalence import torchrun

from phenoflow.train.checkpoint import ema_filename, load_checkpoint, load_safetensors
from phenoflow.train.preemption import EXIT_REQUEUE
from phenoflow.train.snapshots import list_snapshots, load_snapshot


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt")
    torchrun("preemption_worker.py", str(out), timeout=300)
    return out


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(ddp_runs):
    records = json.loads((ddp_runs / "preemption.json").read_text())
    assert [r["preempted"] for r in records] == [True, True], records
    assert all(r["exit_code"] == EXIT_REQUEUE == 75 for r in records)
    stops = {r["samples"] for r in records}
    assert len(stops) == 1, records  # the same step on every rank
    stop = stops.pop()
    assert PW.SIGNAL_AT < stop < PW.TOTAL and all(r["saved"] == stop for r in records)
    assert "SIGTERM" in records[1]["message"] or "SIGTERM" in records[0]["message"] or "another rank" in records[0]["message"]
    assert all(r["handlers_restored"] for r in records)
    ev = events(ddp_runs / "cut")
    pre = [e for e in ev if e["event"] == "preempted"]
    assert len(pre) == 1 and pre[0]["samples"] == stop and pre[0]["exit_code"] == 75
    starts = [e for e in ev if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["samples_seen"] == stop


def test_rerun_after_sigterm_equals_uninterrupted(ddp_runs):
    ref, cut = ddp_runs / "ref", ddp_runs / "cut"
    for f in ("model.safetensors", ema_filename(0.01), ema_filename(0.05)):
        a, b = load_safetensors(ref / "export" / f), load_safetensors(cut / "export" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{f}:{k} differs after SIGTERM + rerun"
    sa, sb = list_snapshots(ref), list_snapshots(cut)
    assert [s for s, _ in sa] == [s for s, _ in sb] and sa[-1][0] == PW.TOTAL
    for (_, pa), (_, pb) in zip(sa, sb):
        ea, eb = load_snapshot(pa)["ema"], load_snapshot(pb)["ema"]
        assert all(torch.equal(ea[k][n], eb[k][n]) for k in ea for n in ea[k]), pa.name


def _cmd(out: Path, name: str, total: int) -> list[str]:
    return [sys.executable, "-m", "phenoflow.cli", "train", "--preset", "demo", *PW.TINY[:-1],
            "train.engine=single", "train.micro_batch_size=0", f"train.total_samples={total}",
            f"run.out_dir={out}", f"run.name={name}"]


def test_sigusr1_to_the_cli_checkpoints_and_exits_75_then_resumes(tmp_path):
    """The process (as SLURM's --signal would) gets SIGUSR1 after its first log line: exit code 75, a
    checkpoint at the step it stopped at, the stop in log.jsonl; the same command then finishes from there."""
    total = 16 * 4000  # far more than the test waits for
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _cmd(tmp_path, "usr1", total)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "usr1" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and '"event": "train"' in log.read_text():
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "SIGUSR1" in err and "rerun the same command" in err, err[-2000:]
    pre = [e for e in events(tmp_path / "usr1") if e["event"] == "preempted"]
    assert len(pre) == 1 and pre[0]["reason"] == "SIGUSR1"
    stop = pre[0]["samples"]
    assert 0 < stop < total
    assert load_checkpoint(tmp_path / "usr1" / "checkpoints" / "latest.pt")["samples_seen"] == stop
    # Resume with a shorter total (allowed: total samples) so the rerun is quick.
    again = subprocess.run(_cmd(tmp_path, "usr1", stop + 32), capture_output=True, text=True, env=env, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    starts = [e for e in events(tmp_path / "usr1") if e["event"] == "start"]
    assert starts[-1]["resumed"] and starts[-1]["samples_seen"] == stop


def test_stop_file_stops_the_run_and_is_removed(tmp_path, monkeypatch):
    """run_dir/STOP (what a job script can touch instead of signalling) stops the run like a signal."""
    import phenoflow.train.preemption as P
    from phenoflow.config import resolve
    from phenoflow.train.trainer import Trainer

    monkeypatch.setattr(P, "STOP_FILE_POLL_S", 0.0)
    cfg = resolve("demo", PW.TINY[:-1] + ["train.engine=single", "train.micro_batch_size=0",
                                          "train.total_samples=320", f"run.out_dir={tmp_path}", "run.name=f"])

    class TouchAt(Trainer):
        def train_step(self, it):
            if self.samples_seen == 64:
                (self.run_dir / "STOP").touch()
            return super().train_step(it)

    torch.manual_seed(0)
    tr = TouchAt(cfg)
    with pytest.raises(P.Preempted) as e:
        tr.fit()
    assert e.value.exit_code == 75 and tr.samples_seen == 96 and tr.saved_samples == 96  # the next step's check
    assert not (cfg.run_dir / "STOP").exists()
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "latest.pt")["samples_seen"] == 96


SBATCH = Path(__file__).resolve().parent.parent / "scripts" / "slurm_32xh100.sbatch"


def _stub_env(tmp_path: Path, srun_exit: int) -> dict:
    """Stand-ins for scontrol / srun / sbatch on PATH: srun waits for RUN_DIR/STOP (what the trainer honours)
    or, with srun_exit 0/3, ends at once with that code; scontrol records a requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo node1; fi\n'
                                      f'if [ "$1" = requeue ]; then echo "$2" > {tmp_path}/requeued; fi\n')
    wait_stop = (f'touch {tmp_path}/srun-started\n'
                 'while [ ! -f "$OUT_DIR/$RUN_NAME/STOP" ]; do sleep 0.05; done\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/bash\n" + (wait_stop if srun_exit < 0 else f"exit {srun_exit}\n"))
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/submitted\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="123", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               OUT_DIR=str(tmp_path / "runs"), RUN_NAME="x", VENV=str(tmp_path / "venv"))
    return env


def test_sbatch_script_turns_usr1_into_a_checkpoint_request_and_requeues(tmp_path):
    env = _stub_env(tmp_path, srun_exit=-1)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "STOP").touch()  # left over from an earlier job: removed at start
    proc = subprocess.Popen(["bash", str(SBATCH)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "srun-started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "srun-started").exists() and proc.poll() is None
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (tmp_path / "requeued").read_text().strip() == "123", out
    assert "USR1: asking the trainer to checkpoint" in out and "requeueing job 123" in out
    assert (tmp_path / "logs").is_dir()
    text = SBATCH.read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text and "--open-mode=append" in text


@pytest.mark.parametrize("code", [0, 3])
def test_sbatch_script_does_not_requeue_a_finished_or_failed_run(tmp_path, code):
    env = _stub_env(tmp_path, srun_exit=code)
    proc = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert not (tmp_path / "requeued").exists()


def test_sbatch_script_outside_slurm_makes_logs_and_submits_itself(tmp_path):
    env = _stub_env(tmp_path, srun_exit=0)
    del env["SLURM_JOB_ID"]
    proc = subprocess.run(["bash", str(SBATCH), "train.total_samples=1000"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "logs").is_dir()
    assert (tmp_path / "submitted").read_text().split() == [str(SBATCH), "train.total_samples=1000"]
