"""Training end to end: the loss falls and samples approach the data; SIGKILL + rerun equals an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from phenoflow.config import resolve
from phenoflow.data.loader import ShardLoader
from phenoflow.data.transforms import encode
from phenoflow.flow.solvers import integrate
from phenoflow.train.checkpoint import ema_filename, load_safetensors
from phenoflow.train.trainer import Trainer

TINY = ["data.image_size=16", "data.train_images=512", "data.val_images=64", "data.samples_per_shard=128",
        "data.num_perturbations=3", "data.num_experiments=2", "model.size=tiny", "model.patch_size=4",
        "train.batch_size=32", "train.lr=1e-3", "train.log_every_samples=1600"]


def channel_stats(x):
    """Per-channel mean and std of a batch of images on [-1, 1]: (2C,)."""
    return torch.cat([x.mean((0, 2, 3)), x.std((0, 2, 3))])


def sample(model, n, C, H, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, C, H, H, generator=g)
    with torch.no_grad():
        x1, _nfe = integrate(lambda t, x: model(x, t.expand(x.shape[0]) if t.ndim == 0 else t, labels), x0,
                            method="euler", steps=10)
    return x1


def test_tiny_model_learns(tmp_path):
    cfg = resolve("demo", TINY + ["train.total_samples=6400", "train.ckpt_every_samples=100000",
                                  f"run.out_dir={tmp_path}", "run.name=learn"])
    trainer = Trainer(cfg)
    model = trainer.model
    val = next(iter(ShardLoader(trainer.data_dir, "val", 64, shuffle=False, drop_last=False, infinite=False)))
    labels = {g: val[g] for g in ("perturbation", "experiment", "cell_type")}
    real = channel_stats(encode(val["image"]))
    model.eval()
    before = (channel_stats(sample(model, 64, 6, 16, labels)) - real).norm().item()
    model.train()
    out = trainer.fit()
    log = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], losses
    ema = load_safetensors(out / ema_filename(0.05))
    model.load_state_dict(ema)
    model.eval()
    after = (channel_stats(sample(model, 64, 6, 16, labels)) - real).norm().item()
    assert after < 0.5 * before, (before, after)


def train_cmd(out_dir, name, total):
    return [sys.executable, "-m", "phenoflow.cli", "train", "--preset", "demo", *TINY,
            f"train.total_samples={total}", "train.ckpt_every_samples=320", f"run.out_dir={out_dir}",
            f"run.name={name}", "model.proj_dropout=0.1"]


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    total = 32 * 100
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.run(train_cmd(tmp_path, "ref", total), capture_output=True, text=True, check=False, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    cmd = train_cmd(tmp_path, "killed", total)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = Path(tmp_path) / "killed" / "checkpoints" / "latest.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let it run past the checkpoint, into steps the rerun must redo
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = (Path(tmp_path) / "killed" / "log.jsonl").read_text()
    assert '"event": "end"' not in log

    again = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    starts = [json.loads(r) for r in (Path(tmp_path) / "killed" / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in starts if r["event"] == "start" and r["resumed"]]
    assert resumed and 0 < resumed[0]["samples_seen"] < total

    for f in ("model.safetensors", ema_filename(0.01), ema_filename(0.05)):
        a = load_safetensors(Path(tmp_path) / "ref" / "export" / f)
        b = load_safetensors(Path(tmp_path) / "killed" / "export" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{f}:{k} differs after resume"
