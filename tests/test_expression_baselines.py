"""Reference baselines of the expression report (phenoflow/eval/expression/baselines.py) on cases with known
answers: the control baseline returns matched controls, the additive baseline adds the training split's single
effects exactly (per condition, the mean over conditions for an untrained condition, nothing for an untrained
component), and on additive data it beats the control baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenoflow.eval.expression.baselines import baseline_split, effects
from phenoflow.eval.expression.generate import (
    SplitCells,
    condition_key,
    control_sources,
)


def cells(x, pert, cell_type) -> SplitCells:
    obs = pd.DataFrame({"condition": pert, "cell_type": cell_type, "dataset": ["d0"] * len(pert),
                        "dose": np.zeros(len(pert))}, index=[f"c{i}" for i in range(len(pert))])
    ctrl = np.asarray([p == "control" for p in pert])
    return SplitCells(np.asarray(x, np.float32), obs, {}, ctrl, [f"g{i}" for i in range(np.shape(x)[1])],
                      "condition", "control", ["cell_type"], "dataset", "dose")


# Gene effects of the singles A and B in cell type k0 (and A in k1); B was never trained in k1, C never at all.
CTRL = {"k0": np.array([1.0, 2.0, 3.0]), "k1": np.array([2.0, 2.0, 2.0])}
EFF = {("A", "k0"): np.array([0.5, 0.0, -1.0]), ("B", "k0"): np.array([0.0, 1.0, 0.25]),
       ("A", "k1"): np.array([1.5, 0.0, 0.0])}


def train_split() -> SplitCells:
    x, pert, ct = [], [], []
    for k, c in CTRL.items():
        for _ in range(3):
            x.append(c), pert.append("control"), ct.append(k)
    for (p, k), e in EFF.items():
        for s in (-0.1, 0.1):  # two cells whose mean is control + effect
            x.append(CTRL[k] + e + s), pert.append(p), ct.append(k)
    x.append(CTRL["k0"] + 9.0), pert.append("A+B"), ct.append("k0")  # a trained combination: not a single effect
    return cells(x, pert, ct)


def test_effects_are_the_training_singles_mean_shifts():
    eff = effects(train_split())
    assert set(eff) == {"A", "B"}
    for (p, k), e in EFF.items():
        np.testing.assert_allclose(eff[p][(k, "d0")], e, atol=1e-6)


def test_additive_and_control_baselines_exact():
    train = train_split()
    test = cells([CTRL["k0"], CTRL["k1"], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
                 ["control", "control", "A+B", "A+B", "B+C", "A+B"], ["k0", "k1", "k0", "k0", "k1", "k1"])
    src = control_sources(test, train)
    ctl, rows, _ = baseline_split("control", test, src, train)
    add, rows2, info = baseline_split("additive", test, src, train, upper=100.0)
    np.testing.assert_array_equal(rows, rows2)
    for x_c, x_a, r in zip(ctl, add, rows):
        k = test.obs["cell_type"].iat[r]
        np.testing.assert_array_equal(x_c, CTRL[k])  # one control per cell type: the draw is that cell
        label = test.obs["condition"].iat[r]
        want = CTRL[k].copy()
        if label == "A+B" and k == "k0":
            want += EFF[("A", "k0")] + EFF[("B", "k0")]
        elif label == "A+B":  # A trained in k1; B only in k0 -> its mean over trained conditions
            want += EFF[("A", "k1")] + EFF[("B", "k0")]
        else:  # B+C in k1: B from k0, C never trained (nothing added, reported)
            want += EFF[("B", "k0")]
        np.testing.assert_allclose(x_a, np.clip(want, 0, 100), atol=1e-5)
    assert info["unseen_components"] == ["C"]
    # Clamped to [0, upper].
    low, _, _ = baseline_split("additive", test, src, train, upper=2.5)
    assert low.max() <= 2.5 and low.min() >= 0


def test_additive_beats_control_on_additive_data():
    """Noisy cells whose combination effect is the sum of its singles: the additive baseline's pseudobulk error
    is far below the control baseline's."""
    rng = np.random.default_rng(0)
    g = 40
    base, ea, eb = rng.uniform(1, 3, g), rng.normal(0, 1, g), rng.normal(0, 1, g)
    draw = lambda mu, n: np.clip(mu + rng.normal(0, 0.3, (n, g)), 0, None)
    train = cells(np.vstack([draw(base, 50), draw(base + ea, 50), draw(base + eb, 50)]),
                  ["control"] * 50 + ["A"] * 50 + ["B"] * 50, ["k"] * 150)
    real_ab = draw(base + ea + eb, 60)
    test = cells(np.vstack([draw(base, 30), real_ab]), ["control"] * 30 + ["A+B"] * 60, ["k"] * 90)
    src = control_sources(test, train)
    err = {}
    for name in ("control", "additive"):
        x, _, _ = baseline_split(name, test, src, train)
        err[name] = np.abs(x.mean(0) - real_ab.mean(0)).mean()
    assert err["additive"] < 0.25 * err["control"], err


def test_unknown_baseline_is_refused():
    train = train_split()
    with pytest.raises(ValueError, match="unknown baseline 'mean'"):
        baseline_split("mean", train, control_sources(train), train)
    assert condition_key(train, 0) == ("k0", "d0")
