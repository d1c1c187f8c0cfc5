"""flow.coupling=control (Config A; control -> perturbed expression): the per-covariate control pool
(phenoflow/train/control_pool.py) through the one trainer, for both modalities."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phenoflow.config import resolve
from phenoflow.data.errors import DataError
from phenoflow.modalities import get_modality
from phenoflow.train.checkpoint import ema_filename, load_safetensors
from phenoflow.train.trainer import Trainer
from tests.test_expression_train import TINY as EXPR_TINY
from tests.trainer_worker import TINY as IMG_TINY

CONTROL = ["flow.coupling=control", "flow.control_noise=0.1"]


def img_cfg(out: Path, name: str, total: int, *extra: str):
    return resolve("demo", [*IMG_TINY, *CONTROL, f"train.total_samples={total}", f"run.out_dir={out}",
                            f"run.name={name}", *extra])


def expr_cfg(out: Path, name: str, total: int, *extra: str):
    return resolve("expression-demo", [*EXPR_TINY, *CONTROL, f"train.total_samples={total}", f"run.out_dir={out}",
                                       f"run.name={name}", *extra])


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def same_exports(a: Path, b: Path) -> None:
    for f in ("model.safetensors", ema_filename(0.05)):
        x, y = load_safetensors(a / "export" / f), load_safetensors(b / "export" / f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


@pytest.mark.parametrize("modality", ["microscopy", "expression"])
def test_pool_draws_only_same_group_controls(tmp_path, modality):
    cfg = (img_cfg if modality == "microscopy" else expr_cfg)(tmp_path, "groups", 16)
    torch.manual_seed(0)
    tr = Trainer(cfg)
    pool = tr.control_pool
    want = ("experiment", "cell_type") if modality == "microscopy" else ("cell_type", "dataset")
    assert pool.groups == want == get_modality(cfg).control_groups(tr.manifest)
    assert pool.num_controls > 0 and len(pool.codes) >= 2  # several groups, each with controls
    # Every draw, through compute_loss: the sources are controls of the targets' own groups.
    drawn = []
    sample = pool.sample
    pool.sample = lambda batch, gen: drawn.append((batch, sample(batch, gen))) or drawn[-1][1]
    it = iter(tr.loader)
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        loss = tr.compute_loss(next(it), gen)
        assert torch.isfinite(loss)
    assert len(drawn) == 6
    for batch, controls in drawn:
        assert bool(controls["is_control"].all())
        assert controls["is_control"].shape == batch["is_control"].shape
        for g in want:
            assert torch.equal(controls[g], batch[g]), g
    # The draw is a function of the step generator: the same generator gives the same controls.
    batch = drawn[0][0]
    a = sample(batch, torch.Generator().manual_seed(7))
    b = sample(batch, torch.Generator().manual_seed(7))
    assert a["key"] == b["key"]
    # The source is the modality's transform of those controls plus noise, not N(0, I).
    gen = torch.Generator().manual_seed(3)
    x0 = pool.source(cfg, tr.modality, batch, gen, tr.device)
    c, _ = tr.modality.batch_to_flow(cfg, pool.sample(batch, torch.Generator().manual_seed(3)),
                                     torch.Generator().manual_seed(99), tr.device)
    assert x0.shape == c.shape
    if modality == "expression":  # no augmentation: x0 - c is exactly the control noise (std 0.1)
        assert abs((x0 - c).std().item() - 0.1) < 0.02


def test_microscopy_stop_and_rerun_equals_uninterrupted(tmp_path):
    """Exact resume with the control pool: stopped at 64 samples (checkpoint) and rerun to 128 = straight 128."""
    for name, totals in (("straight", [128]), ("resumed", [64, 128])):
        for total in totals:
            torch.manual_seed(0)
            tr = Trainer(img_cfg(tmp_path, name, total))
            tr.fit()
    same_exports(tmp_path / "straight", tmp_path / "resumed")
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "latest.pt", weights_only=True, mmap=True)
    assert ckpt["control_pool"][0]["groups"] == ["experiment", "cell_type"]


def test_expression_stop_and_rerun_equals_uninterrupted(tmp_path):
    for name, totals in (("straight", [128]), ("resumed", [64, 128])):
        for total in totals:
            Trainer(expr_cfg(tmp_path, name, total)).fit()
    same_exports(tmp_path / "straight", tmp_path / "resumed")
    # and the control source changes training: an independent-coupling run ends elsewhere
    Trainer(expr_cfg(tmp_path, "noise", 128, "flow.coupling=independent")).fit()
    a = load_safetensors(tmp_path / "straight" / "export" / "model.safetensors")
    b = load_safetensors(tmp_path / "noise" / "export" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_group_without_controls_is_an_error_before_training(tmp_path):
    """Experiment 0 of the train split loses its controls (their label-table flag): the run stops at start,
    naming the experiment, before any step or checkpoint."""
    base = img_cfg(tmp_path, "prep", 16, "flow.coupling=independent")
    data = get_modality(base).prepare_data(base)
    manifest = json.loads((data / "manifest.json").read_text())
    exp0 = manifest["vocabs"]["experiment"][0]
    changed = 0
    for rec in manifest["splits"]["train"]["shards"]:
        path = data / rec["labels"]
        t = json.loads(path.read_text())
        for j, e in enumerate(t["experiment"]):
            if e == exp0 and t["is_control"][j]:
                t["is_control"][j], changed = False, changed + 1
        path.write_text(json.dumps(t))
    assert changed > 0
    cfg = img_cfg(tmp_path, "nocontrols", 64, "data.source=shards", f"data.shards={data}")
    with pytest.raises(DataError) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert f"experiment={exp0!r}" in msg and "no control sample" in msg, msg
    assert not (tmp_path / "nocontrols" / "checkpoints").exists()


def test_expression_loss_falls_with_control_coupling(tmp_path):
    """The control -> perturbed flow learns: the loss on fixed batches (fixed draws) falls with training. Its floor
    is high (the source is an independent control, so part of x1 - x0 is unpredictable): the run's logged
    window losses measured 0.997, 0.954, 0.896 over 60 steps."""
    from phenoflow.data.loader import ShardLoader

    c = expr_cfg(tmp_path, "learn", 32 * 60, "train.lr=3e-3", "train.log_every_samples=640")
    torch.manual_seed(0)
    tr = Trainer(c)
    fixed = list(ShardLoader(tr.data_dir, "train", 32, shuffle=False, infinite=False, drop_last=True))[:4]

    def fixed_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for i, batch in enumerate(fixed):
                torch.manual_seed(i)
                total += tr.compute_loss(batch, torch.Generator().manual_seed(i)).item()
        return total / len(fixed)

    before = fixed_loss()
    tr.fit()
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)
    losses = [e["loss"] for e in events(c.run_dir) if e["event"] == "train"]
    assert losses[-1] < losses[0], losses


class _ZeroVelocity(torch.nn.Module):
    """v(x, t) = 0: the ODE leaves its start point where it is, so the generated cells ARE the sources."""

    def forward(self, x, t, labels):
        return torch.zeros_like(x)


def test_expression_control_model_samples_from_matched_controls(tmp_path):
    """A control -> perturbed expression model is sampled from real control cells of each group's own covariates
    and dataset (not from noise): with a zero velocity and no source noise every generated cell equals one of its
    group's control cells; a trained model's predictions are written with coupling=control in their metadata."""
    import anndata

    from phenoflow.eval.expression.generate import (
        condition_key,
        read_split,
        sample_expression,
    )

    c = expr_cfg(tmp_path, "sample", 64, "flow.control_noise=0", "eval.split=train", "eval.guidance=[1]")
    Trainer(c).fit()
    out = sample_expression(c, model=_ZeroVelocity(), out_dir=tmp_path / "zero")
    pred = anndata.read_h5ad(out["pred"][1.0])
    assert pred.uns["phenoflow"]["coupling"] == "control"
    cells = read_split(out["data_dir"], "train")
    pools: dict = {}
    for i in np.flatnonzero(cells.is_control):
        pools.setdefault(condition_key(cells, int(i)), []).append(cells.x[i])
    gen = pred[pred.obs_names.str.startswith("gen")]
    assert gen.n_obs == int((~cells.is_control).sum()) > 0
    covs = [*cells.covariates, cells.dataset_col]
    x = np.asarray(gen.X)
    for i in range(gen.n_obs):
        key = tuple(str(gen.obs[col].iat[i]) for col in covs)
        pool = np.stack(pools[key])
        assert np.abs(pool - x[i]).max(axis=1).min() == 0, (i, key)  # a row of its own group's controls
    # Across groups the pools differ, so the match above is not vacuous.
    assert len(pools) >= 2
    # The trained model itself samples (finite, clamped, one cell per real perturbed cell).
    trained = sample_expression(c, out_dir=tmp_path / "trained")
    x = np.asarray(anndata.read_h5ad(trained["pred"][1.0]).X)
    assert np.isfinite(x).all() and x.min() >= 0
