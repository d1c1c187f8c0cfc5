"""The run log (phenoflow/train/run_log.py, devices.py): intervals scaled to the run or given in steps,
the first log line at once, MFU against the device's peak (omitted where unknown), ETA, no meaningless CPU
fields, TensorBoard event files (and a run without the package), plain-text progress lines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from phenoflow.config import ConfigError, resolve
from phenoflow.presets import PRESETS
from phenoflow.train import run_log as RL
from phenoflow.train.devices import device_peak, lookup_peak
from phenoflow.train.trainer import Trainer

TINY = ["data.image_size=16", "data.channels=3", "data.train_images=128", "data.val_images=16",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2",
        "model.size=tiny", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "train.batch_size=16", "train.lr=1e-3", "train.precision=fp32", "train.device=cpu",
        "train.log_every_samples=0", "train.ckpt_every_samples=0", "train.snapshots=false"]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_bbbc021_short_run_gets_intervals_that_fit():
    """The issue's case: bbbc021 with 9,600 samples logged nothing for 11 minutes and never checkpointed."""
    t = resolve("bbbc021", ["train.total_samples=9600"]).train
    log, auto = RL.interval_samples(t, "log")
    ckpt, _ = RL.interval_samples(t, "ckpt")
    assert auto and log == 256  # every step (38 steps: 1% rounds to less than one)
    assert ckpt == 4 * 256 and 9600 // ckpt >= 9  # ~10 checkpoints
    big = resolve("mit-xl2-pretrain").train  # 1M steps: a line every 10,000 steps, a checkpoint every 100,000
    assert RL.interval_samples(big, "log")[0] == 10_000 * 256
    assert RL.interval_samples(big, "ckpt")[0] == 100_000 * 256
    assert RL.interval_samples(big, "snapshot")[0] == 50_000 * 256


def test_intervals_in_steps_or_samples():
    t = resolve("demo", ["train.log_every_steps=7", "train.ckpt_every_steps=30", "train.log_every_samples=0",
                         "train.ckpt_every_samples=0"]).train
    assert RL.interval_samples(t, "log") == (7 * 32, False)
    assert RL.interval_samples(t, "ckpt") == (30 * 32, False)
    with pytest.raises(ConfigError, match="log_every_samples and train.log_every_steps"):
        resolve("demo", ["train.log_every_steps=7"])  # the demo sets log_every_samples
    with pytest.raises(ConfigError, match="must be >= 0"):
        resolve("demo", ["train.ckpt_every_steps=-1"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_with_its_intervals(name):
    t = resolve(name).train
    for what in ("log", "ckpt", "snapshot"):
        every, _ = RL.interval_samples(t, what)
        assert 0 < every <= max(t.total_samples, t.batch_size), (name, what, every)


def test_time_rule_asks_for_a_line_each_minute_at_the_start(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(RL.time, "monotonic", lambda: now[0])
    c = RL.Cadence(resolve("bbbc021", ["train.total_samples=25600000"]).train)
    assert c.log_auto and not c.time_due()
    assert c.log_every == 1000 * 256 and c.log_due(0, 256, False)  # the first step of a process: a line
    c.logged()
    assert not c.log_due(256, 512, False) and c.log_due(256, 512, True)
    now[0] += 61
    assert c.time_due()
    c.logged()
    assert not c.time_due()
    now[0] += 600  # after the first ten minutes: the 1% interval only
    assert not c.time_due()
    fixed = RL.Cadence(resolve("demo").train)  # explicit interval: no time rule
    now[0] = fixed.t_start + 120
    assert not fixed.time_due()


def test_device_peak_table():
    assert lookup_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", pytest.approx(989.4e12))
    assert lookup_peak("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert lookup_peak("NVIDIA H200")[0] == "H200"
    assert lookup_peak("NVIDIA A100-SXM4-80GB")[1] == pytest.approx(312e12)
    assert lookup_peak("NVIDIA L40S")[0] == "L40S" and lookup_peak("NVIDIA L40")[0] == "L40"
    assert lookup_peak("Some Future GPU") is None
    assert device_peak(torch.device("cpu")) == ("cpu", None)
    assert device_peak(torch.device("cpu"), 123.0)[1] == pytest.approx(123e12)


def _train(tmp_path, name, *extra):
    cfg = resolve("demo", TINY + ["train.total_samples=96", f"run.out_dir={tmp_path}", f"run.name={name}", *extra])
    torch.manual_seed(0)
    Trainer(cfg).fit()
    return cfg.run_dir


def test_cpu_run_log_has_steps_eta_and_no_meaningless_fields(tmp_path, capsys):
    run = _train(tmp_path, "cpu", "train.progress_every_s=0.000001")
    ev = events(run)
    start = ev[0]
    assert start["event"] == "start" and start["peak_tflops"] is None and start["log_every_samples"] == 16
    train = [e for e in ev if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]  # the first line after the first step
    assert all("mfu" not in e and "peak_mem_gb" not in e for e in train), train[0]
    assert all(e["eta_s"] is not None and e["eta_s"] >= 0 for e in train) and train[-1]["eta_s"] == 0
    saves = [e for e in ev if e["event"] == "checkpoint"]  # auto: ~10 points, here every one of the 6 steps
    assert [e["samples"] for e in saves] == [16, 32, 48, 64, 80, 96] and all(e["seconds"] >= 0 for e in saves)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "loss" in x and "step" in x]
    assert lines and not any("mfu" in x or " mem " in x for x in lines), lines[:2]
    assert "step 6/6" in lines[-1] and "ETA" in lines[-1]
    assert "[progress] step" in err  # not a terminal: plain-text progress lines


def test_peak_flag_gives_mfu_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path, "tb", "train.peak_tflops=0.001")
    train = [e for e in events(run) if e["event"] == "train"]
    assert all(0 < e["mfu"] for e in train)
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no event files next to log.jsonl"
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/grad_norm", "perf/samples_per_s", "perf/mfu", "time/data_s",
                "time/forward_s", "time/backward_s", "time/optimizer_s"):
        assert tag in tags, (tag, sorted(tags))
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == [e["samples"] for e in train]
    assert [pytest.approx(s.value, rel=1e-6) for s in loss] == [e["loss"] for e in train]
    # Evaluation results go to the same folder (phenoflow/eval/sweep.py uses this).
    import numpy as np

    assert RL.log_eval_to_tensorboard(run, 96, {"eval/FD_morph": 1.5}, {"eval/grid": np.zeros((8, 8, 3), np.uint8)})
    acc.Reload()
    assert "eval/FD_morph" in acc.Tags()["scalars"] and "eval/grid" in acc.Tags()["images"]


def test_missing_tensorboard_is_said_once_and_training_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(RL._TensorBoard, "warned", False)
    run = _train(tmp_path, "notb")
    assert not (run / "tensorboard").exists()
    assert [e["event"] for e in events(run)][-1] == "end"
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
