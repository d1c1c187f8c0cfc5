"""Fréchet and kernel distances against independent references; streamed statistics against one-shot ones."""
import numpy as np
import pytest
import scipy.linalg
import torch

from phenoflow.eval.metrics import (
    FeatureStats,
    frechet_distance,
    kernel_distance,
    mmd2_unbiased,
    reference_scale,
    standardize,
)


def fd_scipy(mu1, c1, mu2, c2):
    """Reference: the pytorch-fid formula with scipy's general matrix square root of C1 C2."""
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean).real)


def mmd_direct(x, y, degree=3, coef=1.0):
    """Reference: the unbiased MMD^2 as explicit double sums over distinct pairs."""
    g = 1.0 / x.shape[1]
    k = lambda a, b: (g * a @ b + coef) ** degree
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def _cov(rng, d, cond):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.logspace(0, -np.log10(cond), d)) @ q.T


@pytest.mark.parametrize("cond", [1e1, 1e6, 1e10])
def test_frechet_matches_scipy_reference(cond):
    rng = np.random.default_rng(0)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _cov(rng, d, cond), _cov(rng, d, cond)
    ref = fd_scipy(mu1, c1, mu2, c2)
    got = frechet_distance((mu1, c1), (mu2, c2))
    assert got == pytest.approx(ref, rel=1e-7, abs=1e-8)


def test_frechet_rank_deficient_covariances():
    # Fewer samples than dimensions: singular covariances, as with small eval sets and wide features.
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((20, 40)), rng.standard_normal((25, 40)) * 1.5 + 0.3
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    got = frechet_distance(sa, sb)
    ref = fd_scipy(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0), np.cov(b, rowvar=False))
    assert np.isfinite(got) and got == pytest.approx(ref, rel=1e-5)
    # Identical sets: distance 0 even when singular.
    assert frechet_distance(sa, FeatureStats.from_features(a)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_and_symmetry():
    # Diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance((mu1, np.diag(s1)), (mu2, np.diag(s2))) == pytest.approx(want, rel=1e-12)
    assert frechet_distance((mu2, np.diag(s2)), (mu1, np.diag(s1))) == pytest.approx(want, rel=1e-12)


def test_unbiased_mmd_matches_direct_sum():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((7, 5)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(mmd_direct(x, y), rel=1e-12)


def test_kernel_distance_subsets():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((20, 4)) + 1.0
    # subset_size capped at the smaller set; with one subset covering all of y, KD equals MMD on (subset of x, y)
    m, s = kernel_distance(x, y, subsets=5, subset_size=100, seed=0)
    r = np.random.default_rng(0)
    vals = []
    for _ in range(5):
        vals.append(mmd_direct(x[r.choice(30, 20, replace=False)], y[r.choice(20, 20, replace=False)]))
    assert m == pytest.approx(np.mean(vals), rel=1e-10) and s == pytest.approx(np.std(vals), rel=1e-8)
    # same distribution -> near 0; shifted -> clearly positive
    same, _ = kernel_distance(rng.standard_normal((200, 4)), rng.standard_normal((200, 4)), subsets=20)
    assert abs(same) < 0.02 < m


def test_kernel_distance_defaults_are_100_subsets_of_100():
    # MiT's torch-fidelity settings (kid_subsets=100, kid_subset_size=100): 100 subsets of min(100, n) rows
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((150, 3)), rng.standard_normal((120, 3)) + 0.3
    m, s = kernel_distance(x, y, seed=1)
    r = np.random.default_rng(1)
    vals = [mmd2_unbiased(x[r.choice(150, 100, replace=False)], y[r.choice(120, 100, replace=False)])
            for _ in range(100)]
    assert m == pytest.approx(np.mean(vals), rel=1e-10) and s == pytest.approx(np.std(vals), rel=1e-8)
    # capped at the smallest set: 60 rows each, the whole of both sets, one evaluation (std 0)
    assert kernel_distance(x[:60], y[:60]) == (pytest.approx(mmd2_unbiased(x[:60], y[:60]), rel=1e-12), 0.0)


def test_streamed_equals_one_shot_and_merge():
    rng = np.random.default_rng(4)
    feats = torch.from_numpy(rng.standard_normal((103, 6)) * np.arange(1, 7) + 3)
    one = FeatureStats.from_features(feats)
    streamed = FeatureStats(6)
    for i in range(0, 103, 10):
        streamed.update(feats[i:i + 10])
    merged = FeatureStats.from_features(feats[:50]).merge(FeatureStats.from_features(feats[50:]))
    for s in (streamed, merged):
        assert s.count == 103
        torch.testing.assert_close(s.mean, one.mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(s.cov, one.cov, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.cov, torch.from_numpy(np.cov(feats.numpy(), rowvar=False)), rtol=1e-10, atol=1e-10)
    assert FeatureStats(6).all_reduce().count == 0  # not distributed: a no-op


def test_standardized_stats_equal_stats_of_standardized_features(tmp_path):
    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.standard_normal((80, 5)) * [1, 10, 100, 1e-3, 5] + [0, 1, 2, 3, 4])
    gen = real[:60] * 1.1 + 0.01
    mean, std = reference_scale(FeatureStats.from_features(real))
    a = FeatureStats.from_features(gen).standardized(mean, std)
    b = FeatureStats.from_features(standardize(gen, mean, std))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.cov, b.cov)
    a.save(tmp_path / "sub" / "s.safetensors", meta={"split": "val"})
    c = FeatureStats.load(tmp_path / "sub" / "s.safetensors")
    assert c.count == a.count and torch.equal(c.outer, a.outer)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-finite"):
        FeatureStats(2).update(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        FeatureStats(3).update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(np.zeros((1, 3)), np.zeros((5, 3)))
