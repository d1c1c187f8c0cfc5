"""Distribution distances between feature sets: Fréchet distance and kernel distance (KID-style MMD).

Statistics are streamed in float64 (`FeatureStats`: count, sum, sum of outer products) so features never need to
be held at once for the Fréchet distance, and they add up across batches and ranks exactly (up to float64
summation order). The kernel distance needs the features themselves (it samples subsets).

Conventions (as torch-fidelity / the KID paper, Binkowski et al. 2018):
  FD  = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)), covariances with the n - 1 normaliser.
  KD  = mean over `subsets` random subsets (without replacement, size min(subset_size, n_a, n_b)) of the
        unbiased MMD^2 with the polynomial kernel k(x, y) = (gamma <x, y> + coef)^degree, gamma = 1 / d.
        Defaults: 100 subsets of 100, the settings the MiT public code passes to torch-fidelity's KID.
  Reports give KID x 1000 (the paper's tables); the functions here return the unscaled value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

KID_SCALE = 1000.0  # KID / KD values in reports are multiplied by this (stated in every report)


@dataclass
class FeatureStats:
    """Streamed float64 first and second moments of d-dimensional features."""

    dim: int
    count: int = 0
    total: torch.Tensor | None = None  # (d,) sum of features
    outer: torch.Tensor | None = None  # (d, d) sum of x x^T

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.dim, dtype=torch.float64)
        if self.outer is None:
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    @classmethod
    def from_features(cls, feats: torch.Tensor | np.ndarray) -> FeatureStats:
        feats = torch.as_tensor(feats)
        s = cls(feats.shape[1])
        s.update(feats)
        return s

    def update(self, feats: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features (n, d)."""
        f = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected features of shape (n, {self.dim}), got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"FeatureStats.update: {int((~torch.isfinite(f)).sum())} non-finite feature values")
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics over all torch.distributed ranks (a no-op when not initialised)."""
        import torch.distributed as dist  # only here: eval code is otherwise distribution-free

        if not (dist.is_available() and dist.is_initialized()):
            return self
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.total, self.outer.ravel()])
        packed = packed.to(dev)
        dist.all_reduce(packed)
        packed = packed.cpu()
        self.count = round(packed[0].item())
        self.total = packed[1:1 + self.dim].clone()
        self.outer = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self.count < 1:
            raise ValueError("FeatureStats: no features were added")
        return self.total / self.count

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance (n - 1 normaliser): (sum x x^T - n mu mu^T) / (n - 1)."""
        if self.count < 2:
            raise ValueError(f"FeatureStats: covariance needs at least 2 samples, got {self.count}")
        mu = self.mean
        c = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return (c + c.T) / 2

    def standardized(self, mean: torch.Tensor, std: torch.Tensor) -> FeatureStats:
        """The statistics of z = (x - mean) / std, computed exactly from these moments (no second pass)."""
        mean, std = mean.to(torch.float64), std.to(torch.float64)
        n = self.count
        total = (self.total - n * mean) / std
        # sum (x-m)(x-m)^T = S - s m^T - m s^T + n m m^T, then scaled by 1 / (std_i std_j)
        outer = self.outer - torch.outer(self.total, mean) - torch.outer(mean, self.total) + n * torch.outer(mean, mean)
        outer = outer / torch.outer(std, std)
        return FeatureStats(self.dim, n, total, outer)

    def save(self, path: str | Path, meta: dict[str, str] | None = None) -> None:
        """Atomic write as safetensors (phenoflow.train.checkpoint.save_safetensors: temp file, fsync, rename)."""
        from phenoflow.train.checkpoint import save_safetensors

        tensors = {"count": torch.tensor([self.count], dtype=torch.int64), "total": self.total, "outer": self.outer}
        save_safetensors(tensors, path, metadata=meta or {})

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        from safetensors.torch import load_file

        t = load_file(str(path))
        missing = {"count", "total", "outer"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a FeatureStats file (missing {sorted(missing)})")
        return cls(t["total"].shape[0], int(t["count"][0]), t["total"], t["outer"])


def _moments(s) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(s, FeatureStats):
        return s.mean, s.cov
    mu, cov = s
    return torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)


def _sqrt_psd(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix via eigh; small negative eigenvalues (round-off) are clamped to 0."""
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(stats_a, stats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FeatureStats or (mean, cov) pairs).

    tr((C_a C_b)^(1/2)) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of the symmetric PSD matrix
    M = C_a^(1/2) C_b C_a^(1/2) (similar to C_a C_b). Working with symmetric eigendecompositions keeps this stable
    for singular and ill-conditioned covariances, where a general sqrtm of C_a C_b can turn complex.
    """
    mu_a, c_a = _moments(stats_a)
    mu_b, c_b = _moments(stats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
    s_a = _sqrt_psd(c_a)
    m = s_a @ c_b @ s_a
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    tr_sqrt = lam.sqrt().sum()
    diff = mu_a - mu_b
    fd = diff @ diff + torch.trace(c_a) + torch.trace(c_b) - 2 * tr_sqrt
    return float(fd.clamp_min(0))  # >= 0 mathematically; clamp removes round-off below zero


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma <x, y> + coef)^degree, gamma = 1 / d by default."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                  coef: float = 1.0) -> float:
    """Unbiased MMD^2 estimate between samples x (m, d) and y (n, d) (diagonal terms excluded)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = polynomial_kernel(x, x, degree, gamma, coef), polynomial_kernel(y, y, degree, gamma, coef)
    kxy = polynomial_kernel(x, y, degree, gamma, coef)
    term_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * kxy.mean())


def kernel_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 100, degree: int = 3,
                    gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """KID-style kernel distance: (mean, std) over `subsets` of the unbiased MMD^2 (unscaled, not x 1000).

    Each subset draws min(subset_size, n_a, n_b) rows of each set without replacement (numpy Generator(seed));
    the defaults, 100 subsets of 100, are what the MiT public code passes to torch-fidelity (kid_subsets=100,
    kid_subset_size=100; torch-fidelity's and torchmetrics' own default subset size is 1000).
    When that is all rows of both sets, every subset gives the same value: it is computed once (std 0).
    """
    a = np.asarray(torch.as_tensor(feats_a).double().cpu())
    b = np.asarray(torch.as_tensor(feats_b).double().cpu())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance: feature shapes {a.shape} and {b.shape} are not (n, d) with one d")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"kernel_distance: needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    if m == a.shape[0] == b.shape[0]:  # every subset is the whole of both sets: one evaluation says it all
        return mmd2_unbiased(a, b, degree, gamma, coef), 0.0
    rng = np.random.default_rng(seed)
    vals = np.array([
        mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)],
                      degree, gamma, coef)
        for _ in range(subsets)
    ])
    return float(vals.mean()), float(vals.std())


def standardize(feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """z-score features with a reference set's statistics (used for morphology features, whose raw scales differ).

    clip: when given, z is soft-clipped to clip * tanh(z / clip): the identity (to within 1.4% at |z| = clip / 5)
    for values near the reference distribution, bounded by +-clip for values far outside it, so one feature
    that an untrained model gets wildly wrong cannot dominate FD and KD by orders of magnitude.
    """
    z = (feats.double() - mean.double()) / std.double()
    return z if clip is None else clip * torch.tanh(z / clip)


def reference_scale(stats: FeatureStats, rel_floor: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the reference (real) set for `standardize`.

    std is floored at rel_floor * (1 + |mean|) (1% of the feature's scale: ~2.5 grey levels for intensities on
    [0, 1]) so a feature that is (nearly) constant in the real set does not turn tiny deviations into huge z-scores.
    """
    mean = stats.mean
    std = stats.cov.diagonal().clamp_min(0).sqrt()
    return mean, torch.maximum(std, rel_floor * (1 + mean.abs()))
