"""scripts/slurm_32xh100.sbatch end to end on this machine, as a 2-node allocation at a tiny size.

tests/test_preemption.py's stand-in SLURM commands (`_stub_env`: sbatch, scontrol requeue, the job's
environment) are reused, with two replaced: `scontrol show hostnames` lists the simulated nodes (both this
machine, so `localhost`), and `srun` really runs the script's per-node command once per node, with the
environment SLURM gives each task (SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURMD_NODENAME, a node-local
TMPDIR) and `--kill-on-bad-exit` honoured. The batch script itself is unchanged: what it reads from the
environment (PRESET, GPUS_PER_NODE, MASTER_PORT, VENV, OUT_DIR, RUN_NAME, OMP_NUM_THREADS) sets the size.

One job is signalled like `--signal=B:USR1@300` after its first checkpoint: every rank of both nodes stops
after the same step, the script requeues; the requeued job (same command) resumes there and finishes.
The DeepSpeed launcher's hostfile recipe runs the same way (`--no_ssh --node_rank`, one launcher per "host"),
and without `--no_ssh` it needs pdsh + passwordless ssh, which this machine lacks: that error is checked.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from multinode import TINY, node_env
from test_engine_equivalence import REPO, free_port, torchrun_env
from test_preemption import SBATCH, _stub_env

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

NODES, PER_NODE = 2, 2
# 128 steps of 16: rank 0 looks for the stop file every 5 s, so the job must still be training 5 s after USR1
# even on an idle machine (~0.06 s a step there); on 2 loaded cores it stops after ~15 steps.
TOTAL = 2048
JOB = TINY + ["train.engine=deepspeed", "train.zero_stage=2", f"train.total_samples={TOTAL}",
              "train.ckpt_every_samples=64", "train.peer_timeout_s=10"]

SRUN = r'''#!{python}
"""Stand-in for srun inside a batch script: the command once per node of the allocation, on this machine."""
import json, os, signal, subprocess, sys, time

args, opts = sys.argv[1:], []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
nodes = os.environ["SLURM_JOB_NODELIST_SIM"].split(",")
procs = []
for i, host in enumerate(nodes):
    scratch = os.path.join(os.environ["SIM_ROOT"], f"node{i}-local")
    os.makedirs(scratch, exist_ok=True)
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURMD_NODENAME=host,
               SLURM_NTASKS=str(len(nodes)), SLURM_STEP_NUM_NODES=str(len(nodes)), TMPDIR=scratch)
    with open(os.path.join(os.environ["SIM_ROOT"], f"srun-task{i}.json"), "w") as f:
        json.dump({"opts": opts, "argv": args, "env": {k: v for k, v in env.items() if k.startswith("SLURM")}}, f)
    log = open(os.path.join(os.environ["SIM_ROOT"], f"node{i}.log"), "w")
    procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
    time.sleep(0.5)

def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)

signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
kill_on_bad_exit = "--kill-on-bad-exit=1" in opts
while any(p.poll() is None for p in procs):
    if kill_on_bad_exit and any(p.poll() not in (None, 0) for p in procs):
        forward(signal.SIGTERM, None)
        time.sleep(5)
        forward(signal.SIGKILL, None)
    time.sleep(0.1)
codes = [p.returncode for p in procs]
bad = [c for c in codes if c != 0]
sys.exit(0 if not bad else (bad[0] if bad[0] > 0 else 128 - bad[0]))
'''


def slurm_env(tmp_path: Path) -> dict:
    env = _stub_env(tmp_path, srun_exit=0)  # sbatch, scontrol requeue, SLURM_JOB_ID=123, OUT_DIR, RUN_NAME=x
    bin_dir = tmp_path / "bin"
    (bin_dir / "srun").write_text(SRUN.replace("{python}", sys.executable))
    # `scontrol show hostnames`: the simulated nodes are all this machine; requeue recorded as before.
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then tr , "\\n" <<< "$SLURM_JOB_NODELIST_SIM"; fi\n'
                                      f'if [ "$1" = requeue ]; then echo "$2" > {tmp_path}/requeued; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    base = torchrun_env()
    env.update({k: base[k] for k in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR", "DS_BUILD_OPS")})
    env.update(SLURM_NNODES=str(NODES), SLURM_JOB_NODELIST="sim-node[1-2]",
               SLURM_JOB_NODELIST_SIM=",".join(["localhost"] * NODES), SIM_ROOT=str(tmp_path),
               PRESET="demo", GPUS_PER_NODE=str(PER_NODE), MASTER_PORT=str(free_port()), VENV=sys.prefix,
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def events(run: Path) -> list[dict]:
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def output(tmp_path: Path, script_out: str) -> str:
    return script_out + "".join((tmp_path / f"node{i}.log").read_text(errors="replace")
                                for i in range(NODES) if (tmp_path / f"node{i}.log").exists())


@pytest.fixture(scope="module")
def requeued_job(tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("slurm")
    env = slurm_env(tmp)
    run = tmp / "runs" / "x"
    proc = subprocess.Popen(["bash", str(SBATCH), *JOB], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "log.jsonl").is_file() and any(e["event"] == "checkpoint" for e in events(run)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, output(tmp, proc.communicate()[0])[-6000:]
    proc.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@300 delivers to the batch script
    first, _ = proc.communicate(timeout=400)
    first_rc = proc.returncode
    tasks = [json.loads((tmp / f"srun-task{i}.json").read_text()) for i in range(NODES)]
    shutil.copy(tmp / "node1.log", tmp / "first-node1.log")
    # The requeued job: SLURM runs the same batch script again with the same arguments.
    again = subprocess.run(["bash", str(SBATCH), *JOB], cwd=tmp, env=dict(env, SLURM_RESTART_COUNT="1"),
                           capture_output=True, text=True, timeout=600, check=False)
    return {"tmp": tmp, "run": run, "first": output(tmp, first), "first_rc": first_rc, "tasks": tasks,
            "again": output(tmp, again.stdout + again.stderr), "again_rc": again.returncode}


def test_script_runs_one_torchrun_per_node_with_slurm_environment(requeued_job):
    tasks = requeued_job["tasks"]
    assert [t["env"]["SLURM_NODEID"] for t in tasks] == ["0", "1"]
    for t in tasks:
        argv = t["argv"]
        assert argv[0].endswith("/bin/torchrun") and "--kill-on-bad-exit=1" in t["opts"]
        assert f"--nnodes={NODES}" in argv and f"--nproc_per_node={PER_NODE}" in argv
        assert "--rdzv_backend=c10d" in argv and "--rdzv_id=123" in argv
        assert any(a.startswith("--rdzv_endpoint=localhost:") for a in argv)
    start = next(e for e in events(requeued_job["run"]) if e["event"] == "start")
    assert start["world_size"] == NODES * PER_NODE and start["engine"] == "deepspeed"


def test_usr1_checkpoints_every_node_and_requeues(requeued_job):
    out = requeued_job["first"]
    assert requeued_job["first_rc"] == 0, out[-6000:]
    assert "USR1: asking the trainer to checkpoint" in out and "requeueing job 123" in out, out[-6000:]
    assert (requeued_job["tmp"] / "requeued").read_text().strip() == "123"
    pre = [e for e in events(requeued_job["run"]) if e["event"] == "preempted"]
    assert len(pre) == 1 and 0 < pre[0]["samples"] < TOTAL and pre[0]["exit_code"] == 75
    # The ranks of node 1 stopped too (exit 75, "stopped by ..."), not killed by a failure.
    node1 = (requeued_job["tmp"] / "first-node1.log").read_text(errors="replace")
    assert "rerun the same command to resume" in node1 and "phenoflow watchdog" not in node1, node1[-4000:]


def test_requeued_job_resumes_and_finishes(requeued_job):
    out = requeued_job["again"]
    assert requeued_job["again_rc"] == 0, out[-6000:]
    assert "training finished" in out
    ev = events(requeued_job["run"])
    starts = [e for e in ev if e["event"] == "start"]
    pre = next(e for e in ev if e["event"] == "preempted")
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["samples_seen"] == pre["samples"]
    assert next(e for e in ev if e["event"] == "end")["samples_seen"] == TOTAL
    assert (requeued_job["run"] / "export" / "model.safetensors").is_file()


# ---- the DeepSpeed launcher and a hostfile of two "hosts" -------------------------------------------------------
def test_deepspeed_hostfile_recipe_as_two_hosts_without_ssh(tmp_path):
    """`deepspeed --hostfile H --no_ssh --node_rank i` on each "host" (what pdsh would start there): a 2 x 2 job
    that trains; the same hostfile without --no_ssh needs pdsh over passwordless ssh (refused here)."""
    pytest.importorskip("deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("sim-node-1 slots=2\nsim-node-2 slots=2\n")
    port = free_port()
    train = ["--module", "phenoflow.cli", "train", "--preset", "demo", *TINY, "train.engine=deepspeed",
             "train.total_samples=32", f"run.out_dir={tmp_path}", "run.name=ds"]
    procs = []
    for node in range(2):
        cmd = [str(Path(sys.prefix) / "bin" / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
               *train]
        log = open(tmp_path / f"ds-node{node}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=node_env(tmp_path, node), stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    logs = "".join((tmp_path / f"ds-node{n}.log").read_text(errors="replace") for n in range(2))
    assert codes == [0, 0], logs[-6000:]
    ev = [json.loads(x) for x in (tmp_path / "ds" / "log.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in ev if e["event"] == "start"] == [4]
    assert (tmp_path / "ds" / "export" / "model.safetensors").is_file()
    if shutil.which("pdsh") is None:
        proc = subprocess.run([str(Path(sys.prefix) / "bin" / "deepspeed"), "--hostfile", str(hostfile),
                               "--no_ssh_check", "--master_addr", "127.0.0.1", "--no_local_rank", *train], cwd=REPO,
                              env=torchrun_env(), capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode != 0 and "launcher 'pdsh' not installed" in proc.stdout + proc.stderr
