"""Couplings: exact OT against brute force, control sources from the same experiment."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from phenoflow.flow.couplings import (
    Coupling,
    build_coupling,
    control_source,
    independent,
    minibatch_ot,
    pick_controls,
)


def _cost(x0, x1):
    return ((x0 - x1) ** 2).flatten(1).sum(1).sum().item()


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_minibatch_ot_matches_brute_force(n):
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64) + 0.5
    best = min(_cost(x0[list(p)], x1) for p in itertools.permutations(range(n)))
    paired = minibatch_ot(x0, x1)
    assert paired.shape == x0.shape
    assert abs(_cost(paired, x1) - best) < 1e-9
    # A re-ordering of x0: every row used exactly once.
    match = torch.cdist(paired.flatten(1), x0.flatten(1)).argmin(1)
    assert sorted(match.tolist()) == list(range(n))
    assert _cost(paired, x1) <= _cost(independent(x0, x1), x1) + 1e-12


def test_minibatch_ot_recovers_known_permutation():
    x1 = torch.arange(6.0).view(6, 1) * 10
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    x0 = x1[perm] + 0.1
    torch.testing.assert_close(minibatch_ot(x0, x1), x1 + 0.1)


def test_minibatch_ot_shape_error():
    with pytest.raises(ValueError, match="equal shape"):
        minibatch_ot(torch.zeros(3, 2), torch.zeros(4, 2))


def test_control_source_noise():
    c = torch.zeros(20000, 4)
    x0 = control_source(c, 0.3, torch.Generator().manual_seed(0))
    assert abs(x0.std().item() - 0.3) < 0.01 and abs(x0.mean().item()) < 0.01
    torch.testing.assert_close(control_source(c + 1, 0.0), c + 1)


def test_pick_controls_same_experiment():
    # Each control image is filled with its experiment's id so the draw can be checked.
    pool = {e: torch.full((3 + e, 1, 2, 2), float(e)) + torch.arange(3 + e).view(-1, 1, 1, 1) / 100
            for e in (0, 2, 5)}
    exps = torch.tensor([5, 0, 0, 2, 5, 2, 2, 0])
    picked = pick_controls(exps, pool, torch.Generator().manual_seed(0))
    assert picked.shape == (8, 1, 2, 2)
    torch.testing.assert_close(picked[:, 0, 0, 0].floor(), exps.float())
    again = pick_controls(exps.tolist(), pool, torch.Generator().manual_seed(0))
    torch.testing.assert_close(picked, again)
    # Draws vary across samples of one experiment (not always the first control).
    many = pick_controls(torch.zeros(64, dtype=torch.long), pool, torch.Generator().manual_seed(1))
    assert len(set(many[:, 0, 0, 0].tolist())) == 3


def test_pick_controls_missing_experiment_names_it():
    pool = {0: torch.zeros(2, 3), 1: torch.zeros(0, 3)}
    with pytest.raises(ValueError, match=r"experiment 1 \('plate-B'\) has no control"):
        pick_controls(torch.tensor([0, 1]), pool, experiment_names=["plate-A", "plate-B"])
    with pytest.raises(ValueError, match="experiment 7 has no control"):
        pick_controls([7], pool)


def test_build_coupling():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 3, 4, 4)
    ind = build_coupling(SimpleNamespace(coupling="independent", control_noise=0.1))
    x0 = ind(x1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, torch.randn(5, 3, 4, 4, generator=g))
    ot_c = build_coupling(SimpleNamespace(coupling="ot", control_noise=0.1))
    x0_ot = ot_c(x1, torch.Generator().manual_seed(0))
    assert _cost(x0_ot, x1) <= _cost(x0, x1) + 1e-6
    torch.testing.assert_close(x0_ot.sum(0), x0.sum(0))  # same noise, re-paired
    ctl = build_coupling(SimpleNamespace(coupling="control", control_noise=0.0))
    assert ctl.needs_controls and not ind.needs_controls
    torch.testing.assert_close(ctl(x1, controls=x1 * 0 + 0.25), x1 * 0 + 0.25)
    with pytest.raises(ValueError, match="needs controls"):
        ctl(x1)
    with pytest.raises(ValueError, match="flow.coupling='sinkhorn'"):
        Coupling("sinkhorn")
