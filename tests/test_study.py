"""`phenoflow study`: spec checks, built-in definitions, a tiny study end to end (report with every column, skip
when finished, resume when stopped mid-way), Config A's same-experiment control pairing and noise probability,
the findings paragraph on known numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phenoflow.errors import ConfigError
from phenoflow.flow.couplings import control_source
from phenoflow.study import spec as spec_mod
from phenoflow.study.builtin import builtin
from phenoflow.study.findings import findings
from phenoflow.study.runner import plan, run_study, run_unit, train_config, trained
from phenoflow.train.trainer import Trainer, train
from tests.trainer_worker import TINY

EVAL = ["eval.solver=euler", "eval.steps=2", "eval.batch_size=16", "eval.ema_std=0.05"]
PROTOCOL = ["eval.guidance=[1,2]", "eval.max_images=12", "eval.features=[morphology]"]
CONFIG_A = ["flow.coupling=control", "flow.control_noise=1.0", "flow.control_noise_prob=0.5"]


def tiny_spec(out: Path, total: int = 32) -> spec_mod.Study:
    return spec_mod.from_dict({
        "name": "tiny", "base": "demo", "seeds": [0],
        "overrides": [*TINY, *EVAL, f"train.total_samples={total}", "train.tensorboard=false",
                      "train.snapshots=false", "train.ckpt_every_samples=16"],
        "protocol": PROTOCOL,
        "variants": [
            {"name": "A", "config": "A", "label": "control -> perturbed", "overrides": CONFIG_A,
             "eval_mode": "control"},
            {"name": "B", "config": "B", "label": "noise -> data"},
            {"name": "C", "config": "C", "reuse": "B", "eval_mode": "counterfactual"},
        ]}, out_dir=str(out))


def starts(run: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "log.jsonl").read_text().splitlines())
            if r.get("event") == "start"]


def test_spec_checks(tmp_path):
    good = {"name": "s", "variants": [{"name": "a"}, {"name": "b", "reuse": "a", "eval_mode": "counterfactual"}]}
    st = spec_mod.from_dict(good, str(tmp_path))
    assert st.seeds_of(st.variant("b")) == [0]
    bad = [
        ({"name": "s", "variants": [{"name": "a", "overrides": ["eval.guidance=[3]"]}]}, "protocol"),
        ({"name": "s", "variants": [{"name": "a", "overrides": ["data.image_size=8"]}]}, "same data"),
        ({"name": "s", "variants": [{"name": "a", "reuse": "zz"}]}, "not another variant"),
        ({"name": "s", "variants": [{"name": "a", "eval_mode": "dream"}]}, "eval_mode"),
        ({"name": "s", "variants": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
        ({"name": "s", "variants": [{"name": "a", "eval_overrides": ["train.lr=1"]}]}, "eval.* only"),
        ({"name": "s", "protocol": ["train.lr=1"], "variants": [{"name": "a"}]}, "not eval.* or data.*"),
    ]
    for d, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            spec_mod.from_dict(d, str(tmp_path))
    # A protocol field set by a base override differently per variant cannot happen; a config file can:
    # plan() compares the resolved protocol of every unit.
    st = spec_mod.from_dict({"name": "s", "variants": [{"name": "a"}, {"name": "b"}]}, str(tmp_path))
    st.variants[1].overrides = ["eval.max_images=3"]  # bypassing the spec check on purpose
    with pytest.raises(ConfigError, match="same protocol"):
        plan(st)


def test_builtin_studies_follow_the_paper(tmp_path):
    ds = builtin("mit-design-space", "quick", str(tmp_path))
    names = [v.name for v in ds.variants]
    assert names == [f"{c}-{a}" for a in ("adm", "mit") for c in "ABCDE"]
    units = {u.name: u for u in plan(ds)}
    a = units["train/A-mit-s0"].cfg
    b = units["train/B-mit-s0"].cfg
    assert (a.flow.coupling, a.flow.control_noise, a.flow.control_noise_prob) == ("control", 1.0, 0.5)
    assert ds.variant("A-mit").eval_mode == "control" and a.train.total_samples < b.train.total_samples
    assert units["train/D-mit-s0"].cfg.flow.coupling == "ot"
    assert ds.variant("C-mit").reuse == "B-mit" and ds.variant("C-mit").eval_mode == "counterfactual"
    assert ds.variant("E-mit").reuse == "D-mit" and ds.variant("E-mit").eval_mode == "counterfactual"
    assert all(u.cfg.model.arch == "unet" or u.error for n, u in units.items() if "-adm" in n)
    assert ds.seeds == [0, 1] and "train/B-mit-s1" in units
    # The report before any run: every variant listed, a refused one with the reason, the protocol's columns.
    from phenoflow.study.report import write_study_report

    md = write_study_report(ds).read_text()
    assert "| FD_morph | KD_morph |" in md and md.count("| A-") == 2 and "| E-mit" in md
    for line in (x for x in md.splitlines() if x.startswith("| ") and "-adm " in x):
        refused = units[f"eval/{line[2:].split()[0]}-s0"].error
        assert ("unsupported: " + refused.splitlines()[0][:40] if refused else "| not run |") in line, line
    sp = builtin("sampling", "full", str(tmp_path))
    trains = [u for u in plan(sp) if u.kind == "train"]
    assert {u.variant for u in trains} == {"train-B"} and len(trains) == 3
    solvers = {(u.cfg.eval.solver, u.cfg.eval.rtol if u.cfg.eval.solver == "dopri5" else u.cfg.eval.steps)
               for u in plan(sp) if u.kind == "eval"}
    assert {("dopri5", 1e-5), ("dopri5", 1e-2), ("heun", 5), ("euler", 100)} <= solvers
    it = builtin("interpolants", "quick", str(tmp_path))
    paths = [(u.cfg.flow.path, u.cfg.flow.bridge_sigma) for u in plan(it) if u.kind == "train"]
    assert paths[:2] == [("linear", 0.1), ("vp", 0.1)] and [p[1] for p in paths[2:]] == [0.1, 0.5, 1.0]


def test_control_noise_probability():
    c = torch.zeros(4000, 2, 3, 3)
    x = control_source(c, 1.0, torch.Generator().manual_seed(0), prob=0.5)
    noised = (x.flatten(1).abs().sum(1) > 0).float().mean().item()
    assert 0.45 < noised < 0.55  # about half the sources noised, the rest exactly the control
    # prob = 1 is the previous behaviour, draw for draw.
    y = control_source(c, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(y, 0.3 * torch.randn(c.shape, generator=torch.Generator().manual_seed(1)))


def test_config_a_draws_same_experiment_controls(tmp_path):
    st = tiny_spec(tmp_path)
    cfg = train_config(st, st.variant("A"), 0)
    tr = Trainer(cfg)
    pool = tr.control_pool
    assert pool is not None and "experiment" in pool.groups and len(pool.codes) >= 2
    drawn = []
    sample = pool.sample
    pool.sample = lambda batch, gen: drawn.append((batch, sample(batch, gen))) or drawn[-1][1]
    it = iter(tr.loader)
    for step in range(4):
        assert torch.isfinite(tr.compute_loss(next(it), torch.Generator().manual_seed(step)))
    for batch, controls in drawn:
        assert bool(controls["is_control"].all())
        assert torch.equal(controls["experiment"], batch["experiment"])
    tr.run_lock.release()


def test_tiny_study_report_skip_and_resume(tmp_path):
    st = tiny_spec(tmp_path)
    runs = st.study_dir / "runs"
    # Stopped mid-way: A finished, B half-trained (a checkpoint at 16 of 32 samples), nothing evaluated.
    units = {u.name: u for u in plan(st)}
    run_unit(st, units["train/A-s0"])
    half = train_config(st, st.variant("B"), 0)
    half.train.total_samples = 16
    train(half)
    assert trained(units["train/A-s0"].cfg) and not trained(units["train/B-s0"].cfg)
    assert run_study(st) == 0
    assert len(starts(runs / "A-s0")) == 1  # finished: skipped, no trainer started
    b = starts(runs / "B-s0")
    assert len(b) == 2 and b[1]["resumed"] and b[1]["samples_seen"] == 16  # resumed from its checkpoint
    report = (st.study_dir / "report.md").read_text()
    for col in ("Variant", "Model", "ExaFLOPs", "Flow", "Path", "Coupling", "FD_morph", "KD_morph", "NFE", "w*"):
        assert f"| {col} " in report or f" {col} |" in report, col
    assert "Guidance sweep (Table 4 layout)" in report and "## Findings" in report
    data = json.loads((st.study_dir / "report.json").read_text())
    rows = {r["name"]: r for r in data["variants"]}
    for name in "ABC":
        r = rows[name]
        assert r["best"] is not None and r["exaflops"] and r["exaflops"] > 0, name
        assert [c["w"] for c in r["sweep"]] == [1.0, 2.0]
        assert r["best"]["FD_morph"][0] >= 0 and r["best"]["nfe"][0] >= 2
    assert rows["A"]["flow"] == "control -> perturbed" and rows["C"]["flow"] == "noise -> data (counterfactual)"
    assert rows["C"]["exaflops"] == rows["B"]["exaflops"]
    for line in report.splitlines():  # every grid link points at an evaluation's image
        if line.startswith("- ") and "](" in line:
            assert (st.study_dir / line.split("](")[1].rstrip(")")).is_file(), line
    assert report.count("grid_w") >= 3
    verdicts = {f["finding"][:20]: f["verdict"] for f in data["findings"]}
    assert "MiT" in verdicts["noise -> data (B) be"]  # A and B of the MiT: measured
    assert verdicts["OT couplings (D, E) "].startswith("not measured")
    # Rerun: nothing trained or evaluated again.
    stamps = {p: p.stat().st_mtime_ns for p in st.study_dir.glob("evals/*/metrics.json")}
    assert len(stamps) == 3
    assert run_study(st) == 0
    assert len(starts(runs / "A-s0")) == 1 and len(starts(runs / "B-s0")) == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Time: each unit that ran keeps its wall time; invocations that ran units are listed (the rerun ran none).
    status = json.loads((st.study_dir / "status.json").read_text())
    assert all(status[u]["seconds"] > 0 for u in ("train/B-s0", "eval/A-s0", "eval/B-s0", "eval/C-s0"))
    timing = json.loads((st.study_dir / "timing.json").read_text())
    assert len(timing) == 1 and timing[0]["units_run"] == 4 and timing[0]["wall_s"] > 0  # B's training + 3 evals
    report = (st.study_dir / "report.md").read_text()
    assert "## Time" in report and "- eval: 3 units" in report and "min wall for 4 units, 1 at a time" in report


def _row(name, config, arch, fd, kd, ef=1.0, path="linear", sigma=0.1, mode="generate", coupling="independent"):
    return {"name": name, "config": config, "arch": arch, "path": path, "bridge_sigma": sigma, "eval_mode": mode,
            "coupling": coupling, "exaflops": ef, "best": {"FD": (fd, 0.0), "KD": (kd, 0.0)}}


def test_findings_on_known_numbers():
    data = {"metrics": ["FD", "KD"], "variants": [
        _row("A", "A", "unet", 30, 14, coupling="control"), _row("B", "B", "unet", 10, 1.5),
        _row("C", "C", "unet", 13, 1.1, mode="counterfactual"), _row("D", "D", "unet", 10.5, 1.6, coupling="ot"),
        _row("E", "E", "unet", 13.6, 2.1, mode="counterfactual", coupling="ot"),
        _row("Bm", "B", "mit", 9, 0.8, ef=1.05), _row("vp", "", "mit", 9.5, 1, path="vp"),
        _row("b1", "", "mit", 14, 6, path="bridge", sigma=0.1), _row("b2", "", "mit", 100, 90, path="bridge",
                                                                     sigma=0.5)]}
    f = {x["finding"][:12]: x["verdict"] for x in findings(data)}
    assert f["noise -> dat"].startswith("ADM: holds")
    assert f["counterfactu"].startswith("ADM: holds")
    assert f["OT couplings"].startswith("ADM: holds")
    assert "VP holds close" in f["VP is close "] and "increasingly with sigma: holds" in f["VP is close "]
    assert "at each's budget: holds" in f["the MiT beat"] and "at equal compute: holds" in f["the MiT beat"]
    data["variants"][3]["best"]["FD"] = (5.0, 0.0)  # OT now a clear gain
    assert findings(data)[2]["verdict"].startswith("ADM: does not hold")
    assert findings({"metrics": ["FD", "KD"], "variants": []})[0]["verdict"] == "not measured in this study"


def test_cli_yaml_study_with_parallel_jobs(tmp_path, capsys):
    import yaml

    from phenoflow.cli import main

    spec = tmp_path / "two.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "two", "base": "demo",
        "overrides": [*TINY, *EVAL, "train.total_samples=16", "train.tensorboard=false", "train.snapshots=false"],
        "protocol": ["eval.guidance=[1]", "eval.max_images=8", "eval.features=[morphology]"],
        "variants": [{"name": "B", "config": "B"}, {"name": "D", "config": "D", "overrides": ["flow.coupling=ot"]}]}))
    assert main(["study", str(spec), "--out", str(tmp_path / "studies"), "--jobs", "2"]) == 0
    sd = tmp_path / "studies" / "two"
    status = json.loads((sd / "status.json").read_text())
    assert set(status) == {"train/B-s0", "train/D-s0", "eval/B-s0", "eval/D-s0"}
    assert all(v["state"] == "done" and v["seconds"] > 0 for v in status.values())  # timed in the parent
    assert {p.name for p in (sd / "logs").iterdir()} == {"train_B-s0.log", "train_D-s0.log", "eval_B-s0.log",
                                                          "eval_D-s0.log"}  # each unit its own process
    data = json.loads((sd / "report.json").read_text())
    assert all(r["best"] is not None for r in data["variants"])
    assert "OT couplings (D, E) give no gain" in (sd / "report.md").read_text()
    assert main(["study", "--list"]) == 0 and "mit-design-space" in capsys.readouterr().out


def test_sampler_verdicts_against_the_reference():
    from phenoflow.study.report import solver_table, solver_verdicts

    def row(name, solver, rtol, fd, nfe):
        return {"name": name, "solver": solver, "rtol": rtol, "sampler": name, "seeds": [{}],
                "best": {"w": 1.0, "FD": (fd, 0.0), "KD": (1.0, 0.0), "nfe": (nfe, 0.0)}}

    data = {"metrics": ["FD", "KD"], "variants": [
        row("dopri5-1e-3", "dopri5", 1e-3, 10.2, 60), row("ref", "dopri5", 1e-5, 10.0, 120),
        row("heun-20", "heun", 1e-5, 10.4, 40), row("euler-50", "euler", 1e-5, 10.0, 80),
        row("euler-10", "euler", 1e-5, 14.0, 10)]}
    ref, v = solver_verdicts(data)
    assert ref == "ref" and v["ref"] == "reference"
    assert v["heun-20"].startswith("reaches") and v["dopri5-1e-3"].startswith("reaches")
    assert v["euler-50"].startswith("does not reach") and v["euler-10"].startswith("does not reach")
    assert "Reaching the goal: dopri5-1e-3, heun-20." in "\n".join(solver_table(data))


def test_killed_study_process_resumes(tmp_path):
    """`phenoflow study` killed (SIGKILL) while its second variant trains: the rerun skips the first, resumes the
    second from its last checkpoint, evaluates both."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    spec = tmp_path / "k.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "k", "base": "demo", "out_dir": str(tmp_path / "studies"),
        "overrides": [*TINY, *EVAL, "train.tensorboard=false", "train.snapshots=false",
                      "train.ckpt_every_samples=16", "train.log_every_samples=16"],
        "protocol": ["eval.guidance=[1]", "eval.max_images=8", "eval.features=[morphology]"],
        "variants": [{"name": "B", "config": "B", "overrides": ["train.total_samples=16"]},
                     {"name": "D", "config": "D", "overrides": ["flow.coupling=ot", "train.total_samples=1600"]}]}))
    runs = tmp_path / "studies" / "k" / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "phenoflow", "study", str(spec)], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = runs / "D-s0" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if log.is_file() and '"event": "checkpoint"' in log.read_text():
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert '"event": "checkpoint"' in log.read_text() and not (runs / "D-s0" / "export").exists()
    st = spec_mod.load(spec)
    st.variants[1].overrides = ["flow.coupling=ot", "train.total_samples=64"]  # finish quickly (an allowed change)
    assert run_study(st) == 0
    assert len(starts(runs / "B-s0")) == 1
    d = starts(runs / "D-s0")
    assert len(d) == 2 and d[1]["resumed"] and d[1]["samples_seen"] > 0
    assert all((tmp_path / "studies" / "k" / "evals" / f"{v}-s0" / "metrics.json").is_file() for v in "BD")


def test_config_a_sampling_starts_from_same_experiment_controls(tmp_path):
    from phenoflow.data.loader import ShardLoader
    from phenoflow.data.prepare import prepare_data
    from phenoflow.eval.evaluate import evaluate
    from phenoflow.eval.generate import ControlPool, generate, sample_noise

    class ZeroVelocity(torch.nn.Module):  # the solver returns the source x0 unchanged
        def forward(self, x, t, labels):
            return torch.zeros_like(x)

        def null_labels(self, labels, groups):
            return labels

    def matches(imgs: list[torch.Tensor], c: torch.Tensor, inside: torch.Tensor) -> bool:
        return bool((((torch.stack(imgs).float() - c).abs() * inside).flatten(1).amax(1) <= 1.0).any())

    st = tiny_spec(tmp_path)
    cfg = train_config(st, st.variant("A"), 0)
    assert cfg.flow.coupling == "control" and st.variant("A").eval_mode == "control"
    data = prepare_data(cfg)
    read = list(ShardLoader(data, cfg.eval.split, cfg.eval.batch_size, seed=0, shuffle=False, drop_last=False,
                            infinite=False))
    pool = ControlPool()
    for b in read:
        pool.add_batch(b)
    cfg.eval.solver, cfg.eval.steps = "euler", 1
    gen, labels, _ = generate(ZeroVelocity(), read, cfg.eval, 2.0, seed=3, mode="control", controls=pool,
                              control_noise=cfg.flow.control_noise)
    keys = labels["key"]
    noise = sample_noise(keys, tuple(gen.shape[1:]), 3)
    # Undo the decoding (x * 127.5 + 128, truncated) and the noise: back to the control's pixels (+- 1).
    c = ((gen.float() - 128 + 0.5) / 127.5 - cfg.flow.control_noise * noise + 1) * 127.5
    inside = (gen > 0) & (gen < 255)  # clipped pixels say nothing
    for i, k in enumerate(keys):
        e = int(labels["experiment"][i])
        assert pool.pick(e, k, 3)[1]["experiment"] == e
        assert matches(pool.images[e], c[i], inside[i]), k  # a control of its own experiment
        assert not any(matches(pool.images[o], c[i], inside[i]) for o in pool.images if o != e), k
    independent = train_config(st, st.variant("B"), 0)
    with pytest.raises(ConfigError, match="flow.coupling=independent"):
        evaluate(independent, tmp_path / "B", report_dir=tmp_path / "rep", mode="control")
    assert not (tmp_path / "rep").exists()