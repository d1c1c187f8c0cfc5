"""Classifier-free guidance against hand computation with a small fake model (the MiT interface)."""
import pytest
import torch

from phenoflow.flow.guidance import guided_velocity, make_velocity_fn
from phenoflow.flow.solvers import integrate

SIZES = {"perturbation": 4, "experiment": 3, "cell_type": 2}


class FakeModel(torch.nn.Module):
    """v = x * (1 + p) + t * (e + 1) + 10 c, with labels nulled to index = vocabulary size; counts forwards."""

    def __init__(self):
        super().__init__()
        self.batch_sizes: list[int] = []

    def null_index(self, group):
        return SIZES[group]

    def null_labels(self, labels, groups):
        out = dict(labels)
        for g in groups:
            out[g] = torch.full_like(labels[g], self.null_index(g))
        return out

    def forward(self, x, t, labels):
        self.batch_sizes.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        p = labels["perturbation"].float().view(-1, 1, 1, 1)
        e = labels["experiment"].float().view(-1, 1, 1, 1)
        c = labels["cell_type"].float().view(-1, 1, 1, 1)
        return x * (1 + p) + t.view(-1, 1, 1, 1) * (e + 1) + 10 * c


def _inputs(b=3):
    x = torch.randn(b, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])[:b]
    labels = {"perturbation": torch.tensor([0, 2, 3])[:b], "experiment": torch.tensor([1, 0, 2])[:b],
              "cell_type": torch.tensor([1, 0, 1])[:b]}
    return x, t, labels


def _hand(x, t, labels, w, null_p=True, null_e=False):
    p = labels["perturbation"].float().view(-1, 1, 1, 1)
    e = labels["experiment"].float().view(-1, 1, 1, 1)
    c = labels["cell_type"].float().view(-1, 1, 1, 1)
    tt = t.view(-1, 1, 1, 1)
    v_cond = x * (1 + p) + tt * (e + 1) + 10 * c
    p0 = torch.full_like(p, SIZES["perturbation"]) if null_p else p
    e0 = torch.full_like(e, SIZES["experiment"]) if null_e else e
    v_null = x * (1 + p0) + tt * (e0 + 1) + 10 * c
    return v_null + w * (v_cond - v_null)


@pytest.mark.parametrize("w", [0.0, 1.5, 2.0, 4.0])
def test_formula_against_hand_computation(w):
    model = FakeModel()
    x, t, labels = _inputs()
    torch.testing.assert_close(guided_velocity(model, x, t, labels, w), _hand(x, t, labels, w))
    v2 = guided_velocity(model, x, t, labels, w, groups=("perturbation", "experiment"))
    torch.testing.assert_close(v2, _hand(x, t, labels, w, null_e=True))


def test_w1_single_conditional_forward():
    model = FakeModel()
    x, t, labels = _inputs()
    v = guided_velocity(model, x, t, labels, 1.0)
    assert model.batch_sizes == [3]
    torch.testing.assert_close(v, _hand(x, t, labels, 1.0))


def test_two_branches_in_one_batched_forward():
    model = FakeModel()
    x, t, labels = _inputs()
    v = guided_velocity(model, x, t, labels, 2.5)
    assert model.batch_sizes == [6]
    # Same result as two separate forwards.
    v_cond = model(x, t, labels)
    v_null = model(x, t, model.null_labels(labels, ("perturbation",)))
    torch.testing.assert_close(v, v_null + 2.5 * (v_cond - v_null))
    assert labels["perturbation"].tolist() == [0, 2, 3]  # caller's labels untouched


def test_velocity_fn_with_scalar_time_and_solver():
    model = FakeModel()
    x, _, labels = _inputs()
    fn = make_velocity_fn(model, labels, 2.0)
    torch.testing.assert_close(fn(torch.tensor(0.5), x), _hand(x, torch.full((3,), 0.5), labels, 2.0))
    model.batch_sizes.clear()
    _, nfe = integrate(fn, x, method="euler", steps=5)
    assert nfe == 5 and model.batch_sizes == [6] * 5
