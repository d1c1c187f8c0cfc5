"""Generation for evaluation (one image per real image, deterministic per sample key), sample files, grids, report."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from phenoflow.config import resolve
from phenoflow.errors import ConfigError
from phenoflow.eval.generate import (
    ControlPool,
    decode,
    encode,
    generate,
    load_samples,
    sample_noise,
    save_samples,
)
from phenoflow.eval.grids import grid_rows, save_grid
from phenoflow.eval.report import write_report
from phenoflow.model.mit import build_model

VOCAB = {"perturbation": 4, "experiment": 2, "cell_type": 1}


@pytest.fixture(scope="module")
def setup():
    cfg = resolve("demo", ["data.image_size=16", "model.depth=2", "model.hidden_size=32", "model.num_heads=2"])
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    with torch.no_grad():  # the final layer is zero-initialised: give the untrained field some structure
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
        for blk in model.blocks:
            for p in blk.adaLN_modulation.parameters() if hasattr(blk, "adaLN_modulation") else []:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    n = 10
    data = {
        "image": torch.randint(0, 256, (n, 6, 16, 16), dtype=torch.uint8, generator=g),
        "perturbation": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]),
        "experiment": torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
        "cell_type": torch.zeros(n, dtype=torch.long),
        "dose": torch.zeros(n),
        "is_control": torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool),
        "key": [f"s{i:03d}" for i in range(n)],
    }
    return cfg, model, data


def batches(data, size, order=None):
    order = list(range(len(data["key"]))) if order is None else order
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield {k: ([v[j] for j in idx] if k == "key" else v[torch.tensor(idx)]) for k, v in data.items()}


def test_one_image_per_real_image_deterministic_by_key(setup):
    cfg, model, data = setup
    cfg.eval.solver, cfg.eval.steps = "euler", 3
    imgs, labels, nfe = generate(model, batches(data, 4), cfg.eval, 2.0, seed=7)
    assert imgs.dtype == torch.uint8 and imgs.shape == data["image"].shape
    assert nfe == 3 and labels["key"] == data["key"]
    for k in ("perturbation", "experiment", "cell_type", "is_control"):
        assert torch.equal(labels[k], data[k])
    # Another batch size and order gives the same image for each key.
    order = [9, 3, 5, 0, 1, 8, 2, 7, 6, 4]
    imgs2, labels2, _ = generate(model, batches(data, 3, order), cfg.eval, 2.0, seed=7)
    pos = {k: i for i, k in enumerate(labels2["key"])}
    assert torch.equal(imgs2[[pos[k] for k in data["key"]]], imgs)
    # Guidance and labels matter; the seed changes the noise.
    other, _, _ = generate(model, batches(data, 4), cfg.eval, 1.0, seed=7)
    assert not torch.equal(other, imgs)
    assert not torch.equal(generate(model, batches(data, 4), cfg.eval, 2.0, seed=8)[0], imgs)
    assert generate(model, batches(data, 4), cfg.eval, 2.0, seed=7, max_images=5)[0].shape[0] == 5
    assert not torch.equal(sample_noise(["a"], (2,), 0), sample_noise(["b"], (2,), 0))


def test_counterfactual_round_trip_and_missing_control(setup):
    cfg, model, data = setup
    cfg.eval.solver, cfg.eval.rtol, cfg.eval.atol = "dopri5", 1e-6, 1e-6
    pool = ControlPool()
    for b in batches(data, 4):
        pool.add_batch(b)
    # A control as its own target (the only control in its pool), w = 1: back to noise and forward again
    # returns the image up to the solver's error.
    ctrl = {k: v[:1] for k, v in data.items()}
    own = ControlPool()
    own.add_batch(ctrl)
    imgs, _, nfe = generate(model, [ctrl], cfg.eval, 1.0, mode="counterfactual", controls=own)
    assert nfe > 10
    assert (imgs.int() - data["image"][:1].int()).abs().max() <= 1
    cfg.eval.solver, cfg.eval.steps = "euler", 2  # the rest checks shapes, labels and errors only
    cf, labels, nfe = generate(model, batches(data, 5), cfg.eval, 1.5, mode="counterfactual", controls=pool)
    assert nfe == 4  # 2 steps back to noise, 2 forward
    assert cf.shape == data["image"].shape and torch.equal(labels["perturbation"], data["perturbation"])
    empty = ControlPool()
    with pytest.raises(ValueError, match="no control image for experiment index 0"):
        generate(model, batches(data, 4), cfg.eval, 1.0, mode="counterfactual", controls=empty)


class ZeroVelocity(torch.nn.Module):
    """A velocity field that is zero everywhere: the solver returns its source unchanged."""

    def forward(self, x, t, labels):
        return torch.zeros_like(x)

    def null_labels(self, labels, groups):
        return labels


def test_control_mode_starts_from_same_experiment_control_plus_noise(setup):
    cfg, _, data = setup
    cfg.eval.solver, cfg.eval.steps = "euler", 2
    pool = ControlPool()
    for b in batches(data, 4):
        pool.add_batch(b)
    imgs, labels, nfe = generate(ZeroVelocity(), batches(data, 3), cfg.eval, 2.0, seed=5, mode="control",
                                 controls=pool, control_noise=0.3)
    assert nfe == 2 and labels["key"] == data["key"] and imgs.shape == data["image"].shape
    noise = sample_noise(data["key"], tuple(data["image"].shape[1:]), 5)
    for i, k in enumerate(data["key"]):
        e = int(data["experiment"][i])
        c, c_labels = pool.pick(e, k, 5)
        assert c_labels["experiment"] == e and any(c is x for x in pool.images[e])  # the sample's own experiment
        assert torch.equal(imgs[i], decode(encode(c) + 0.3 * noise[i])), k
    # control_noise 0 (the default): exactly the picked control.
    bare, _, _ = generate(ZeroVelocity(), batches(data, 4), cfg.eval, 2.0, seed=5, mode="control", controls=pool)
    assert torch.equal(bare, torch.stack([pool.pick(int(e), k, 5)[0] for e, k in zip(data["experiment"].tolist(),
                                                                                      data["key"])]))
    with pytest.raises(ValueError, match="control generation needs a ControlPool"):
        generate(ZeroVelocity(), batches(data, 4), cfg.eval, 1.0, mode="control")
    with pytest.raises(ValueError, match="'generate', 'counterfactual' or 'control'"):
        generate(ZeroVelocity(), batches(data, 4), cfg.eval, 1.0, mode="bogus")


def test_control_mode_refused_for_a_run_not_trained_with_control_coupling(setup, tmp_path):
    from phenoflow.eval.evaluate import evaluate, sample

    cfg, model, _ = setup
    assert cfg.flow.coupling == "independent"
    for fn in (evaluate, sample):
        with pytest.raises(ConfigError, match="mode control samples from control images.*flow.coupling=independent"):
            fn(cfg, tmp_path / "run", model=model, mode="control", data_dir=tmp_path / "none")
    assert not (tmp_path / "run").exists()


def test_samples_file_grid_and_report(setup, tmp_path):
    _, _, data = setup
    labels = {k: data[k] for k in ("perturbation", "experiment", "cell_type", "dose", "is_control", "key")}
    path = save_samples(tmp_path / "s" / "w2.npz", data["image"], labels, w=2.0, nfe=12.0)
    imgs, lab, meta = load_samples(path)
    assert torch.equal(imgs, data["image"]) and lab["key"] == data["key"] and meta == {"w": 2.0, "nfe": 12.0}
    assert torch.equal(lab["is_control"], data["is_control"])

    rows = grid_rows(data["image"], data["perturbation"], data["image"], data["perturbation"],
                     ["control", "a", "b", "c"], k=2)
    assert list(rows) == ["control", "a", "b", "c"] and rows["control"][0].shape[0] == 2
    png = save_grid(rows, tmp_path / "grid.png", k=2, title="w = 2")
    im = Image.open(png)
    assert im.size[1] >= 4 * 64 and im.size[0] > 4 * 64

    results = {"run_dir": "r", "split": "val", "num_real": 10, "solver": {"method": "heun"},
               "features": {"morphology": {"dim": 65}},
               "features_skipped": {"inception": "eval.inception_weights is not set"},
               "sweep": [{"w": 1.0, "nfe": 20, "metrics": {"FD_morph": 3.5, "KD_morph": 1.25, "KD_morph_std": 0.1}},
                         {"w": 2.0, "nfe": 40, "metrics": {"FD_morph": 2.5, "KD_morph": 0.75, "KD_morph_std": 0.1}}],
               "grids": ["grid.png"]}
    out = write_report(tmp_path, results)
    md = (out / "metrics.md").read_text()
    assert "| w | NFE | FD_morph | KD_morph (x1000) |" in md and "| 2.000 | 40 | 2.500 | 0.750 |" in md
    assert "morphology" in md and "inception: not computed" in md
    js = json.loads((out / "metrics.json").read_text())
    assert js["kd_scale"] == 1000 and js["sweep"][1]["metrics"]["FD_morph"] == 2.5
    assert np.asarray(Image.open(out / "guidance.png")).size > 0
