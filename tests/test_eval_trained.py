"""A tiny MiT trained briefly on the synthetic benchmark scores better than the untrained one (FD/KD_morph).

The untrained MiT has a zero-initialised output layer, so its samples are the source noise. Measured with this
config: FD_morph ~2700 untrained, ~900 after 100 steps (lr 2e-3), ~130 after 300 steps; KD_morph 7e7 -> 3e6.
"""
import json

import pytest
import torch

from phenoflow.config import resolve
from phenoflow.eval.evaluate import evaluate
from phenoflow.model.mit import build_model
from phenoflow.train.trainer import train

TINY = ["data.image_size=16", "data.train_images=512", "data.val_images=64", "data.samples_per_shard=128",
        "data.num_perturbations=3", "data.num_experiments=2", "model.size=tiny", "model.patch_size=4",
        "model.depth=2", "model.hidden_size=64",
        "train.batch_size=32", "train.lr=1e-3", "train.log_every_samples=3200", "train.ckpt_every_samples=100000",
        "eval.solver=euler", "eval.steps=10", "eval.guidance=[1]", "eval.batch_size=64", "train.device=cpu"]


@pytest.mark.slow
def test_trained_model_scores_better_than_untrained(tmp_path):
    cfg = resolve("demo", TINY + ["train.total_samples=3200", "train.lr=2e-3", f"run.out_dir={tmp_path}", "run.name=trained"])
    train(cfg)
    trained = evaluate(cfg, cfg.run_dir, progress=False)  # EMA weights from run_dir/export
    vocab = json.loads((cfg.run_dir / "export" / "model.json").read_text())["vocab_sizes"]
    torch.manual_seed(0)
    untrained = evaluate(cfg, cfg.run_dir, model=build_model(cfg, vocab), report_dir=tmp_path / "untrained",
                         progress=False)
    a = json.loads((trained / "metrics.json").read_text())["sweep"][0]["metrics"]
    b = json.loads((untrained / "metrics.json").read_text())["sweep"][0]["metrics"]
    assert a["FD_morph"] < 0.5 * b["FD_morph"], (a, b)
    assert a["KD_morph"] < 0.2 * b["KD_morph"], (a, b)
