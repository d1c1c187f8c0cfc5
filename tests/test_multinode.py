"""The 32-GPU recipe's multi-node behaviour on one machine: two `torchrun` launchers as two nodes x 2 processes
(c10d rendezvous on localhost, gloo, node-local scratch per node, shared run folder; tests/multinode.py).

- Parity: ddp, ZeRO-2, ZeRO-3 and FSDP2 over 2 nodes x 2 equal one process on the same global batch (the
  tolerances of tests/test_engine_equivalence.py, whose checks run here on the 4-rank results); the loader
  yields every sample exactly once over ranks of both nodes, from shards rank 0 wrote into the shared folder.
- World-size changes through `phenoflow train` (ZeRO-2, the recipe's engine): one process -> 2 nodes ->
  1 node (2 processes) -> 2 nodes -> one process, each hop resuming from the previous one's checkpoint.
- A dead rank stops the job: SIGKILL of one worker of node 1, then (after the rerun) SIGKILL of the whole
  node 0 (its launcher, which hosts the c10d store, and its workers), then SIGSTOP of a worker (frozen: only the
  watchdog notices); every process of every node exits within BOUND_S (frozen: FROZEN_BOUND_S), a line names
  the dead rank and its node, and rerunning the same command resumes from the last checkpoint and ends with
  the same weights as an uninterrupted run.
- The watchdog alone (tests of phenoflow/train/watchdog.py in subprocesses): a frozen peer, a peer that exited
  with an error, an unreachable store.

Wall time on 2 shared cores: see docs/distributed.md section 7.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_engine_equivalence as EQ
from multinode import REPO, TINY, Cluster, process_env, train_cmd

from phenoflow.train.checkpoint import ema_filename, load_safetensors

ENGINES = ["ddp:0", "deepspeed:2", "deepspeed:3", "fsdp2:0"]
ZERO2 = ["train.engine=deepspeed", "train.zero_stage=2"]
TOTAL = 160  # 10 steps of 16 samples (4 ranks x micro-batch 4); a checkpoint every 32 samples
PEER_TIMEOUT_S = 10
# Death -> every process of the job gone: gloo notices the dead peer's closed sockets at once (a frozen peer:
# the watchdog after PEER_TIMEOUT_S), the watchdog's naming pass takes 3 heartbeat intervals (3 s here), the
# launchers react within their monitor interval. Measured 2-11 s on 2 loaded cores; the bound leaves room.
BOUND_S = PEER_TIMEOUT_S + 20
# A frozen rank (SIGSTOP: alive, sockets open, so gloo waits): the watchdog ends the others after PEER_TIMEOUT_S,
# then the frozen rank's own torchrun needs its shutdown grace (SIGTERM, SIGKILL after 30 s) to remove it.
FROZEN_BOUND_S = PEER_TIMEOUT_S + 30 + 20
FAIL = [f"train.peer_timeout_s={PEER_TIMEOUT_S}"]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def starts(run: Path) -> list[dict]:
    return [e for e in events(run) if e["event"] == "start"]


# ---- parity and exactly-once ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("mn-parity")
    Cluster(root).run([str(REPO / "tests" / "multinode.py"), "parity", str(root), ",".join(ENGINES)], "parity",
                      timeout=900)
    return root, json.loads((root / "results.json").read_text())


def test_ranks_spread_over_nodes_with_node_local_scratch(parity):
    root, res = parity
    ranks = sorted(res["ranks"], key=lambda r: r["placement"]["rank"])
    place = [r["placement"] for r in ranks]
    assert [p["rank"] for p in place] == [0, 1, 2, 3]
    by_node = {n: sorted(p["rank"] for p in place if p["node"] == n) for n in (0, 1)}
    assert sorted(map(len, by_node.values())) == [2, 2], place  # two ranks on each launcher
    # c10d numbers the launchers itself (GROUP_RANK; --node-rank is for the static rendezvous): one per launcher
    assert sorted({p["group_rank"] for p in place if p["node"] == n}.pop() for n in (0, 1)) == [0, 1], place
    assert all(len({p["group_rank"] for p in place if p["node"] == n}) == 1 for n in (0, 1)), place
    for p in place:
        assert p["local_rank"] == p["rank"] % 2 and p["rank"] // 2 == p["group_rank"], p
        assert p["tmpdir"] == str(root / f"node{p['node']}-local" / "tmpdir"), p


def test_loader_exactly_once_over_nodes(parity):
    _, res = parity
    keys = [k for r in res["ranks"] for k in r["keys"]]
    assert sorted(keys) == [f"train_{i:08d}" for i in range(53)], "a sample missed or repeated across nodes"
    assert all(r["keys"] for r in res["ranks"])


@pytest.mark.parametrize("spec", ENGINES)
def test_two_nodes_match_one_process(parity, spec):
    """tests/test_engine_equivalence.py's checks on the 2 x 2 results: losses, gradient norms, weights and EMA
    against one process; NaN skip; native and consolidated reload repeat the next step; the consolidated state
    (4 ranks -> 1) continues in this process and the export reproduces the distributed model's outputs."""
    _, res = parity
    assert spec in res and res[spec]["records"], f"the 2 x 2 run has no results for {spec}: {sorted(res)}"
    EQ.test_engine_matches_single_process(parity, spec)
    EQ.test_nonfinite_skip_and_checkpoints(parity, spec)
    EQ.test_consolidated_resume_and_export_in_one_process(parity, spec)


# ---- world-size changes through the CLI ---------------------------------------------------------------------
def single_process(out: Path, name: str, total: int) -> None:
    """`phenoflow train` of the same run in this process (engine single): what the CLI does, without its start-up."""
    from phenoflow.config import resolve
    from phenoflow.train.trainer import train

    torch.manual_seed(0)
    train(resolve("demo", TINY + ["train.engine=single", f"train.total_samples={total}", f"run.out_dir={out}",
                                  f"run.name={name}"]))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One run, five launches: 1 process -> 2 nodes -> 1 node -> 2 nodes -> 1 process, each to its own total
    (training length is a change a resume allows; so are the engine and the world size)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("mn-chain")
    hops = [("single", 32), ("2 nodes", 64), ("1 node", 96), ("2 nodes", 112), ("single", TOTAL)]
    for i, (where, total) in enumerate(hops):
        if where == "single":
            single_process(root, "chain", total)
        else:
            Cluster(root, nnodes=2 if where == "2 nodes" else 1).run(
                train_cmd(root, "chain", *ZERO2, f"train.total_samples={total}"), f"hop{i}")
    return root / "chain", hops


def test_world_size_changes_resume(chain):
    run, hops = chain
    st = starts(run)
    assert [s["world_size"] for s in st] == [1, 4, 2, 4, 1]
    assert [s["resumed"] for s in st] == [False, True, True, True, True]
    assert [s["samples_seen"] for s in st] == [0] + [t for _, t in hops[:-1]]
    # Every hop trained from where the previous stopped to its own total, in steps of the global batch.
    trained = [e["samples"] for e in events(run) if e["event"] == "train"]
    assert trained == sorted(trained) and trained[-1] == TOTAL
    assert all(0 < e["loss"] < 5 for e in events(run) if e["event"] == "train")
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["samples_seen"] == TOTAL and ckpt["layout"]["world_size"] == 1
    assert (run / "export" / "model.safetensors").is_file()


# ---- a dead rank, a dead node -------------------------------------------------------------------------------
def wait_for_checkpoint(run: Path, after: int, cluster: Cluster, timeout: float = 300) -> int:
    """Block until log.jsonl records a checkpoint past `after` samples; returns its sample count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "log.jsonl").is_file():
            done = [e["samples"] for e in events_safe(run) if e["event"] == "checkpoint" and e["samples"] > after]
            if done:
                return max(done)
        if any(c is not None for c in cluster.poll()):
            break
        time.sleep(0.05)
    cluster.kill_all()
    raise AssertionError(f"no checkpoint past {after} samples:\n{cluster.output()[-6000:]}")


def events_safe(run: Path) -> list[dict]:
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def kill_and_time(cluster: Cluster, kill) -> float:
    """Run `kill()`; seconds until every process of the job (both launchers and all they started) is gone."""
    before = cluster.live()
    t0 = time.monotonic()
    kill()
    while time.monotonic() - t0 < 300:
        if not [p for p in before if Path(f"/proc/{p}").exists() and _running(p)]:
            cluster.wait(30)
            return time.monotonic() - t0
        cluster.poll()
        time.sleep(0.02)
    cluster.kill_all()
    raise AssertionError(f"processes still alive 300 s after the kill:\n{cluster.output()[-6000:]}")


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """The reference (uninterrupted, 2 nodes) and one run killed twice, frozen once, each time rerun with the
    same command."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("mn-fail")
    cmd = train_cmd(root, "fail", *ZERO2, *FAIL, f"train.total_samples={TOTAL}")
    Cluster(root).run(train_cmd(root, "ref", *ZERO2, *FAIL, f"train.total_samples={TOTAL}"), "ref")
    run, rec, last = root / "fail", {}, 0

    c = Cluster(root).start(cmd, "kill-rank")
    last = wait_for_checkpoint(run, last, c)
    victims = c.workers(1)
    rank = max(victims)
    group = int(process_env(victims[rank])["GROUP_RANK"])
    rec["rank"] = {"killed_rank": rank, "group_rank": group, "checkpoint": last,
                   "seconds": kill_and_time(c, lambda: os.kill(victims[rank], signal.SIGKILL)),
                   "codes": [p.returncode for p in c.procs], "output": c.output()}

    c = Cluster(root).start(cmd, "kill-node")
    last = wait_for_checkpoint(run, last, c)
    node0_ranks = sorted(c.workers(0))
    group = int(process_env(c.workers(0)[node0_ranks[0]])["GROUP_RANK"])
    rec["node"] = {"killed_ranks": node0_ranks, "group_rank": group, "checkpoint": last, "seconds": kill_and_time(c, lambda: c.kill_node(0)),
                   "codes": [p.returncode for p in c.procs], "output": c.output()}

    c = Cluster(root).start(cmd, "freeze")
    last = wait_for_checkpoint(run, last, c)
    victims = c.workers(1)
    rank = min(victims)
    group = int(process_env(victims[rank])["GROUP_RANK"])
    rec["frozen"] = {"frozen_rank": rank, "group_rank": group, "checkpoint": last,
                     "seconds": kill_and_time(c, lambda: os.kill(victims[rank], signal.SIGSTOP)),
                     "codes": [p.returncode for p in c.procs], "output": c.output()}

    Cluster(root).run(cmd, "finish")
    (root / "timings.json").write_text(json.dumps({k: v["seconds"] for k, v in rec.items()}))
    return root, rec


def test_killed_rank_stops_every_node_within_the_bound(failures):
    _, rec = failures
    r = rec["rank"]
    print(f"SIGKILL of rank {r['killed_rank']}: whole job gone after {r['seconds']:.1f} s")
    assert r["seconds"] < BOUND_S, r["seconds"]
    assert all(code != 0 for code in r["codes"]), r["codes"]
    rank = r["killed_rank"]
    assert f"rank {rank} (node {r['group_rank']}, host" in r["output"] and "stopped answering: it died" in r["output"], \
        r["output"][-5000:]
    assert "Rerun the same command to resume from the last checkpoint" in r["output"]


def test_killed_node_stops_the_other_node_within_the_bound(failures):
    _, rec = failures
    r = rec["node"]
    print(f"SIGKILL of node 0 (launcher + ranks {r['killed_ranks']}): whole job gone after {r['seconds']:.1f} s")
    assert r["seconds"] < BOUND_S, r["seconds"]
    assert r["codes"][1] != 0, r["codes"]
    out = r["output"].split("===== node 1 =====")[1]
    assert "the node hosting it (node 0's launcher or rank 0) has died" in out or \
        f"(node {r['group_rank']}, host" in out and "stopped answering" in out, out[-5000:]


def test_frozen_rank_is_detected_by_the_watchdog(failures):
    """SIGSTOP: nothing closes, gloo would wait for its timeout (30 min); the heartbeats stop."""
    _, rec = failures
    r = rec["frozen"]
    print(f"SIGSTOP of rank {r['frozen_rank']}: whole job gone after {r['seconds']:.1f} s")
    assert r["seconds"] < FROZEN_BOUND_S, r["seconds"]
    assert all(code != 0 for code in r["codes"]), r["codes"]
    assert f"from rank {r['frozen_rank']} (node {r['group_rank']}, host" in r["output"] and "died or hung" in r["output"], \
        r["output"][-5000:]


def test_rerun_resumes_from_the_last_checkpoint_exactly(failures):
    root, rec = failures
    st = starts(root / "fail")
    assert [s["resumed"] for s in st] == [False, True, True, True]
    assert [s["samples_seen"] for s in st[1:]] == [rec[k]["checkpoint"] for k in ("rank", "node", "frozen")]
    assert all(s["world_size"] == 4 for s in st)
    for f in ("model.safetensors", ema_filename(0.01), ema_filename(0.05)):
        a = load_safetensors(root / "ref" / "export" / f)
        b = load_safetensors(root / "fail" / "export" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{f}:{k} differs after two kills and reruns"


# ---- the watchdog alone ---------------------------------------------------------------------------------------
WATCHDOG = """
import os, sys, time
import torch.distributed as dist
from phenoflow.train.watchdog import Watchdog
case = sys.argv[1]
master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
os.environ.update(GROUP_RANK="0", LOCAL_RANK="0")
wd = Watchdog(0, 2, 1.0, "127.0.0.1", master.port, interval_s=0.2)
peer = dist.TCPStore("127.0.0.1", master.port, is_master=False, wait_for_workers=False)
peer.set(wd._key("who", 1), "rank 1 (node 1, host h, local rank 0, pid 42)")
wd.start()
t0 = time.monotonic()
while time.monotonic() - t0 < {run_s}:
    if case == "alive":
        peer.add(wd._key("hb", 1), 1)
    elif case in ("exited", "normal") and time.monotonic() - t0 > 0.5:
        peer.add(wd._key("exit", 1), 2 if case == "exited" else 1)
        case = "done"
    elif case == "store" and time.monotonic() - t0 > 0.5:
        del peer, master
        case = "gone"
    time.sleep(0.05)
print("still running")
"""


@pytest.mark.parametrize("case,code,says", [
    ("frozen", 70, "no heartbeat for"), ("exited", 70, "exited"), ("store", 70, "is unreachable"),
    ("alive", 0, "still running"), ("normal", 0, "still running")])
def test_watchdog(tmp_path, case, code, says):
    """A peer whose counter stops (frozen), that exited with an error while this rank runs on, or a vanished
    store: exit 70 within ~timeout + 2 intervals, naming the peer; a beating peer or a normal exit: nothing."""
    script = tmp_path / "wd.py"
    script.write_text(textwrap.dedent(WATCHDOG.replace("{run_s}", "4")))
    proc = subprocess.run([sys.executable, str(script), case], cwd=REPO, env=EQ.torchrun_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr[-3000:]
    assert says in proc.stdout + proc.stderr, proc.stderr[-3000:]
    if code:
        assert "still running" not in proc.stdout  # ended by the watchdog, before the script's own end (4 s)
        if case != "store":
            assert "rank 1 (node 1, host h, local rank 0, pid 42)" in proc.stderr
