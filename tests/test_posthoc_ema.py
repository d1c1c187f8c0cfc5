"""Post-hoc EMA (phenoflow/train/posthoc_ema.py, EDM2): the closed-form profile inner products, the discrete
EMA as the continuous profile, exact recovery of a tracked profile, and a width reconstructed from two other
widths' snapshots that agrees with tracking it directly (a toy trajectory and a real training run)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from phenoflow.config import resolve
from phenoflow.train.ema import PowerFunctionEMA, std_to_gamma
from phenoflow.train.posthoc_ema import (
    export_posthoc,
    profile_inner,
    reconstruct,
    solve_coefficients,
)
from phenoflow.train.snapshots import list_snapshots, load_snapshot
from phenoflow.train.trainer import Trainer


def _profile(t, g):
    return lambda x: (g + 1) * x**g / t ** (g + 1) if 0 <= x <= t else 0.0


@pytest.mark.parametrize("ta,ga,tb,gb", [(3.0, 5.0, 7.0, 2.0), (7.0, 2.0, 3.0, 5.0), (4.0, 10.0, 4.0, 3.0),
                                         (100.0, 16.97, 250.0, 6.94)])
def test_inner_product_matches_numerical_integration(ta, ga, tb, gb):
    num = quad(lambda x: _profile(ta, ga)(x) * _profile(tb, gb)(x), 0, max(ta, tb), limit=400, points=[min(ta, tb)])[0]
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(num, rel=1e-7)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(profile_inner(tb, gb, ta, ga), rel=1e-12)


def test_discrete_ema_is_the_continuous_profile():
    """The weight of step k in the EMA after n steps is the profile's mass on (k-1, k] (ema.py (1), (2))."""
    n, std = 50, 0.1
    g = std_to_gamma(std)
    param = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    holder = nn.Module()
    holder.p = param
    ema = PowerFunctionEMA(holder, stds=(std,))
    for k in range(1, n + 1):
        with torch.no_grad():
            param.zero_()
            param[k - 1] = 1.0  # theta_k = e_k: the average's entries are the step weights
        ema.update(holder, cur_nimg=k, batch_size=1)
    w = ema.averaged(std)["p"].double().numpy()
    k = np.arange(1, n + 1)
    assert np.allclose(w, (k ** (g + 1) - (k - 1) ** (g + 1)) / n ** (g + 1), rtol=1e-5, atol=1e-7)


def test_a_tracked_profile_is_recovered_exactly():
    g1, g2 = std_to_gamma(0.05), std_to_gamma(0.10)
    times = np.arange(1, 21) * 100.0
    t = np.concatenate([times, times])
    g = np.r_[[g1] * 20, [g2] * 20]
    for j in (19, 39, 12):
        x, res = solve_coefficients(t, g, t[j], g[j])
        assert res < 1e-9 and x[j] == pytest.approx(1.0, abs=1e-6)
        assert np.abs(np.delete(x, j)).max() < 1e-6
    x, res = solve_coefficients(t, g, 2000.0, std_to_gamma(0.07))  # in between: close, weights sum to ~1
    assert res < 1e-4 and x.sum() == pytest.approx(1.0, abs=1e-3)
    _, res_far = solve_coefficients(t, g, 2000.0, std_to_gamma(0.005))  # far narrower than tracked: worse
    assert res_far > 10 * res


def _toy_run(n_steps=400, every=10, stds=(0.05, 0.10, 0.07), dim=64, seed=0):
    """A random-walk trajectory with drift; every `every` steps a snapshot of each width."""
    rng = np.random.default_rng(seed)
    holder = nn.Module()
    holder.p = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    ema = PowerFunctionEMA(holder, stds=stds)
    theta = np.zeros(dim)
    drift = rng.normal(size=dim)
    snaps = []
    for k in range(1, n_steps + 1):
        theta = theta + 0.02 * drift + 0.05 * rng.normal(size=dim)
        with torch.no_grad():
            holder.p.copy_(torch.from_numpy(theta))
        ema.update(holder, cur_nimg=k, batch_size=1)
        if k % every == 0:
            snaps.append((k, {s: ema.averaged(s)["p"].double().numpy() for s in stds}))
    return snaps


def test_toy_trajectory_reconstruction_agrees_with_direct_tracking():
    snaps = _toy_run()
    use = (0.05, 0.10)
    terms = [(k, s) for k, _ in snaps for s in use]
    x, res = solve_coefficients([k for k, _ in terms], [std_to_gamma(s) for _, s in terms], 400.0,
                                std_to_gamma(0.07))
    rec = sum(c * dict(snaps)[k][s] for c, (k, s) in zip(x, terms))
    direct, lo, hi = snaps[-1][1][0.07], snaps[-1][1][0.05], snaps[-1][1][0.10]
    err = np.linalg.norm(rec - direct)
    assert err < 1e-3 * np.linalg.norm(hi - lo), (err, np.linalg.norm(hi - lo), res)  # seen 3e-5


def test_reconstruction_from_a_training_runs_snapshots(tmp_path):
    """A real run tracks 0.05, 0.10 and 0.07; 0.07 rebuilt from the 0.05/0.10 snapshots agrees closely."""
    cfg = resolve("demo", [
        "data.image_size=16", "data.channels=3", "data.train_images=128", "data.val_images=16",
        "data.samples_per_shard=64", "model.size=tiny", "model.depth=2", "model.hidden_size=32",
        "model.num_heads=2", "model.patch_size=4", "train.batch_size=8", "train.lr=3e-3",
        "train.precision=fp32", "train.device=cpu", "train.total_samples=480", "train.tensorboard=false",
        "train.ema_stds=[0.05,0.10,0.07]", "train.snapshot_every_steps=3", f"run.out_dir={tmp_path}", "run.name=ph"])
    torch.manual_seed(0)
    Trainer(cfg).fit()
    snaps = list_snapshots(cfg.run_dir)
    assert len(snaps) == 20 and snaps[-1][0] == 480
    rec, info = reconstruct(cfg.run_dir, 0.07, use_stds=[0.05, 0.10])
    last = load_snapshot(snaps[-1][1])["ema"]
    direct, lo, hi = last["0.0700"], last["0.0500"], last["0.1000"]
    err = sum((rec[n] - direct[n]).double().pow(2).sum() for n in direct) ** 0.5
    spread = sum((hi[n] - lo[n]).double().pow(2).sum() for n in direct) ** 0.5
    base = min(sum((x[n] - direct[n]).double().pow(2).sum() for n in direct) ** 0.5 for x in (lo, hi))
    assert err < 0.01 * spread and err < 0.01 * base, (float(err), float(spread), float(base), info["residual"])
    assert info["at_samples"] == 480 and len(info["coefficients"]) == 40
    # A tracked width at a snapshot time comes back as that snapshot, and `--at` selects earlier snapshots.
    same, info2 = reconstruct(cfg.run_dir, 0.05, at=snaps[9][0], use_stds=[0.05, 0.10])
    mid = load_snapshot(snaps[9][1])["ema"]["0.0500"]
    assert info2["residual"] < 1e-9 and all(torch.allclose(same[n], mid[n], atol=1e-5) for n in mid)
    out = export_posthoc(cfg.run_dir, 0.07, use_stds=[0.05, 0.10])
    assert out.name == "ema-0.0700.safetensors" and out.parent.name == "posthoc"
