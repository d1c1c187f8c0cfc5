"""Power-function EMA: gamma from std, the profile's width, averaging against explicit weights, state dicts."""
import numpy as np
import pytest
import torch

from phenoflow.train.ema import PowerFunctionEMA, gamma_to_std, std_key, std_to_gamma

STDS = [0.01, 0.05, 0.1, 0.2, 0.28]


def _profile_std(gamma: float, n: int = 1_000_000) -> float:
    """Std of x ~ (gamma + 1) x^gamma on [0, 1] by midpoint quadrature (no closed form used)."""
    x = (np.arange(n) + 0.5) / n
    p = (gamma + 1) * x**gamma / n
    mean = (p * x).sum()
    return float(np.sqrt((p * (x - mean) ** 2).sum()))


@pytest.mark.parametrize("std", STDS)
def test_gamma_is_largest_real_root(std):
    g = std_to_gamma(std)
    s = std**-2
    assert g > 0
    assert abs(g**3 + 7 * g**2 + (16 - s) * g + (12 - s)) < 1e-8 * max(1.0, g**3)
    # The other roots of the cubic lie below 0.
    others = [r for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r - g) > 1e-6]
    assert all(r.real < 0 for r in others)
    # The closed form (3) and a direct quadrature of the profile both give back std.
    assert abs(gamma_to_std(g) - std) < 1e-10
    assert abs(_profile_std(g) - std) < 1e-4 * std + 1e-6


def test_known_values_and_errors():
    # Hand-checked: std = 0.2 -> s = 25 -> g^3 + 7 g^2 - 9 g - 13 = 0 has the root g ~ 1.8262.
    g = std_to_gamma(0.2)
    assert abs(g**3 + 7 * g**2 - 9 * g - 13) < 1e-9 and 1.826 < g < 1.827
    assert std_to_gamma(0.01) > std_to_gamma(0.05)  # narrower profile <-> larger exponent
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="EMA std"):
            std_to_gamma(bad)


def test_discrete_profile_has_the_requested_width():
    """With beta_k = (1 - 1/k)^(gamma + 1), the weights of a long run form the power profile of width std."""
    std, K = 0.05, 20_000
    g = std_to_gamma(std)
    k = np.arange(1, K + 1, dtype=np.float64)
    beta = (1 - 1 / k) ** (g + 1)
    # weight_k = (1 - beta_k) prod_{j > k} beta_j
    tail = np.concatenate([np.cumprod(beta[::-1])[::-1][1:], [1.0]])
    w = (1 - beta) * tail
    assert abs(w.sum() - 1) < 1e-9
    x = k / K
    mean = (w * x).sum()
    assert abs(np.sqrt((w * (x - mean) ** 2).sum()) - std) < 0.01 * std


class Scalar(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("stat", torch.zeros(3, dtype=dtype))


def test_averaging_matches_explicit_weighted_sum():
    stds, b, K = (0.05, 0.2), 4, 60
    model = Scalar()
    ema = PowerFunctionEMA(model, stds)
    vals = torch.randn(K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in range(1, K + 1):
        with torch.no_grad():
            model.w.fill_(vals[k - 1].item())
            model.steps.fill_(k)
        ema.update(model, cur_nimg=k * b, batch_size=b)
    for std in stds:
        g = std_to_gamma(std)
        betas = [(1 - b / (k * b)) ** (g + 1) for k in range(1, K + 1)]
        expected = 0.0
        for k in range(K):
            expected += (1 - betas[k]) * float(np.prod(betas[k + 1:])) * vals[k].item()
        avg = ema.averaged(std)
        torch.testing.assert_close(avg["w"], torch.full((2,), expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        assert avg["steps"].item() == K  # buffers are copied, not averaged
    assert not torch.equal(ema.averaged(0.05)["w"], ema.averaged(0.2)["w"])


def test_fp32_storage_for_bf16_model():
    model = Scalar(torch.bfloat16)
    ema = PowerFunctionEMA(model, (0.01,))
    with torch.no_grad():
        model.w.fill_(1.0)
        model.stat.fill_(2.0)
    ema.update(model, cur_nimg=8, batch_size=8)  # first step: beta = 0, the average is the weights
    avg = ema.averaged(0.01)
    assert avg["w"].dtype == torch.float32 and avg["stat"].dtype == torch.float32
    assert avg["steps"].dtype == torch.long
    torch.testing.assert_close(avg["w"], torch.ones(2))
    torch.testing.assert_close(avg["stat"], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="cur_nimg"):
        ema.update(model, cur_nimg=4, batch_size=8)
    with pytest.raises(KeyError, match="0.02 is not tracked"):
        ema.averaged(0.02)


def test_state_dict_round_trip(tmp_path):
    model = Scalar()
    ema = PowerFunctionEMA(model, (0.01, 0.05))
    for k in range(1, 6):
        with torch.no_grad():
            model.w.add_(1.0)
        ema.update(model, k * 2, 2)
    sd = ema.state_dict()
    assert sorted(sd) == [std_key(0.01), std_key(0.05)] == ["0.0100", "0.0500"]
    torch.save(sd, tmp_path / "ema.pt")
    loaded = torch.load(tmp_path / "ema.pt", weights_only=True)
    other = PowerFunctionEMA(Scalar(), (0.01, 0.05))
    other.load_state_dict(loaded)
    for std in (0.01, 0.05):
        for name, t in ema.averaged(std).items():
            assert torch.equal(other.averaged(std)[name], t)
    # The averaged weights load into a model.
    fresh = Scalar()
    fresh.load_state_dict(other.averaged(0.05))
    torch.testing.assert_close(fresh.w, ema.averaged(0.05)["w"])
    with pytest.raises(ValueError, match="tracks"):
        PowerFunctionEMA(Scalar(), (0.01,)).load_state_dict(loaded)
    bad = {k: {**v, "w": torch.zeros(5)} for k, v in loaded.items()}
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)
