"""Numbered snapshots (phenoflow/train/snapshots.py): at an interval besides latest.pt, with every tracked EMA
profile, a retention count, the end of the run included, none when switched off; resume leaves them intact."""
from __future__ import annotations

import torch

from phenoflow.config import resolve
from phenoflow.train.checkpoint import ema_filename, load_safetensors
from phenoflow.train.ema import gamma_to_std
from phenoflow.train.snapshots import (
    SNAPSHOT_FORMAT,
    list_snapshots,
    load_snapshot,
    snapshot_dir,
)
from phenoflow.train.trainer import Trainer

TINY = ["data.image_size=16", "data.channels=3", "data.train_images=128", "data.val_images=16",
        "data.samples_per_shard=64", "model.size=tiny", "model.depth=2", "model.hidden_size=32",
        "model.num_heads=2", "model.patch_size=4", "train.batch_size=8", "train.lr=1e-3", "train.precision=fp32",
        "train.device=cpu", "train.tensorboard=false"]


def _cfg(tmp_path, name, total, *extra):
    return resolve("demo", TINY + [f"train.total_samples={total}", f"run.out_dir={tmp_path}", f"run.name={name}",
                                   *extra])


def _fit(cfg):
    torch.manual_seed(0)
    return Trainer(cfg).fit()


def test_snapshots_at_the_interval_with_every_profile_and_retention(tmp_path):
    cfg = _cfg(tmp_path, "keep", 8 * 11, "train.snapshot_every_steps=2", "train.snapshot_keep=3")
    out = _fit(cfg)
    snaps = list_snapshots(cfg.run_dir)
    # every 2 steps (16, 32, ..., 80) and the end (88); the newest 3 kept
    assert [s for s, _ in snaps] == [64, 80, 88]
    assert (cfg.run_dir / "checkpoints" / "latest.pt").is_file()
    last = load_snapshot(snaps[-1][1])
    assert last["format"] == SNAPSHOT_FORMAT and last["samples_seen"] == 88 and last["batch_size"] == 8
    assert last["stds"] == [0.01, 0.05] and sorted(last["ema"]) == ["0.0100", "0.0500"]
    for key, g in last["gammas"].items():
        assert abs(gamma_to_std(g) - float(key)) < 1e-9
    for std in (0.01, 0.05):  # the final snapshot holds exactly the exported averages
        exported = load_safetensors(out / ema_filename(std))
        snap = last["ema"][f"{std:.4f}"]
        assert all(torch.equal(exported[n], snap[n]) for n in exported)
    assert not [p for p in snapshot_dir(cfg.run_dir).iterdir() if p.name.startswith(".")]  # no temporaries


def test_default_snapshots_scale_with_the_run_and_can_be_switched_off(tmp_path):
    cfg = _cfg(tmp_path, "auto", 8 * 40)
    _fit(cfg)
    assert [s for s, _ in list_snapshots(cfg.run_dir)] == [16 * i for i in range(1, 21)]  # ~20 points
    off = _cfg(tmp_path, "off", 8 * 10, "train.snapshots=false")
    _fit(off)
    assert list_snapshots(off.run_dir) == [] and not snapshot_dir(off.run_dir).exists()


def test_resumed_run_continues_the_snapshot_series(tmp_path):
    ref = _cfg(tmp_path, "ref", 8 * 12, "train.snapshot_every_steps=3")
    _fit(ref)
    cut = _cfg(tmp_path, "cut", 8 * 7, "train.snapshot_every_steps=3")
    _fit(cut)  # stops at 56 samples: snapshots 24, 48 and the end 56
    assert [s for s, _ in list_snapshots(cut.run_dir)] == [24, 48, 56]
    _fit(_cfg(tmp_path, "cut", 8 * 12, "train.snapshot_every_steps=3"))  # resumed to the full length
    got = list_snapshots(cut.run_dir)
    want = list_snapshots(ref.run_dir)
    assert [s for s, _ in got] == [24, 48, 56, 72, 96] and [s for s, _ in want] == [24, 48, 72, 96]
    for (s, p), (_, q) in zip([g for g in got if g[0] != 56], want):
        a, b = load_snapshot(p)["ema"], load_snapshot(q)["ema"]
        assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k]), s


def test_guidance_by_ema_width_sweep(tmp_path):
    """`phenoflow evaluate --run-dir RUN --ema-sweep ...`: tracked, raw and post-hoc widths, every guidance."""
    import json
    import os
    import subprocess
    import sys

    from phenoflow.eval.sweep import model_for_width

    cfg = _cfg(tmp_path, "sw", 8 * 20, "train.snapshot_every_steps=2")
    out = _fit(cfg)
    tracked, prov = model_for_width(cfg.run_dir, 0.05)
    exported = load_safetensors(out / ema_filename(0.05))
    assert prov["source"] == "tracked (export)"
    assert all(torch.equal(t, exported[n]) for n, t in tracked.state_dict().items() if n in exported)
    rebuilt, prov = model_for_width(cfg.run_dir, 0.05, at=8 * 20)  # post hoc, at a snapshot of that width
    assert prov["source"] == "post-hoc reconstruction" and prov["residual"] < 1e-9
    assert all(torch.allclose(t, exported[n], atol=1e-5) for n, t in rebuilt.state_dict().items() if n in exported)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "phenoflow.cli", "evaluate", "--run-dir", str(cfg.run_dir), "--ema-sweep",
           "0,0.05,0.03", "eval.solver=euler", "eval.steps=2", "eval.guidance=[1,2]", "eval.max_images=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((cfg.run_dir / "report" / "sweep" / "sweep.json").read_text())
    assert [(r["ema_std"], r["w"]) for r in result["rows"]] == [(s, w) for s in (0.0, 0.05, 0.03) for w in (1, 2)]
    assert [w["source"] for w in result["widths"]] == ["raw weights", "tracked (export)", "post-hoc reconstruction"]
    assert all("FD_morph" in r for r in result["rows"]) and "FD_morph" in result["best"]
    assert (cfg.run_dir / "report" / "sweep" / "sweep.md").is_file()
    assert (cfg.run_dir / "report" / "sweep" / "ema-0.0300" / "metrics.json").is_file()
    # Each width's report says which weights it scored (not "a model passed in by the caller").
    lines = {std: next(x for x in (cfg.run_dir / "report" / "sweep" / f"ema-{std}" / "metrics.md").read_text()
                       .splitlines() if x.startswith("Model: ")) for std in ("0.0000", "0.0500", "0.0300")}
    assert "raw weights" in lines["0.0000"] and "model.safetensors" in lines["0.0000"]
    assert "EMA width 0.05" in lines["0.0500"] and "ema-0.0500.safetensors" in lines["0.0500"]
    assert "EMA width 0.03" in lines["0.0300"] and "post-hoc EMA reconstructed from" in lines["0.0300"]
    assert all("samples seen" in x and "caller" not in x for x in lines.values()), lines
    # Evaluation results also land in the run's TensorBoard folder: the sweep over widths, a plain evaluate at
    # the run's sample count.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    plain = subprocess.run(cmd[:6] + cmd[8:], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert plain.returncode == 0, plain.stderr[-3000:]
    mux = EventMultiplexer().AddRunsFromDirectory(str(cfg.run_dir / "tensorboard"))
    mux.Reload()
    tags = {t for run in mux.Runs().values() for t in run.get("scalars", [])}
    images = {t for run in mux.Runs().values() for t in run.get("images", [])}
    assert {"sweep/FD_morph/w1", "sweep/FD_morph/w2", "eval/FD_morph/w1"} <= tags, sorted(tags)
    assert any(t.startswith("sweep/grid/") for t in images) and any(t.startswith("eval/grid/") for t in images)
