"""Post-hoc EMA (Karras et al. 2024, EDM2 section 3): an average of any width, chosen after training, as a
linear combination of the snapshots of the tracked widths (phenoflow/train/snapshots.py).

A power-function EMA of width std (exponent gamma, phenoflow/train/ema.py) at time t weighs the training
trajectory theta(tau) with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   on [0, t]                       (1)

(the discrete update beta = (1 - b / t)^(gamma + 1) realises (1) exactly for weights that are constant over
each step: the weight of step k of n is (k^(gamma+1) - (k-1)^(gamma+1)) / n^(gamma+1)). Every snapshot i holds
the average under p_i = p_{t_i, gamma_i} for each tracked width. The average under a wanted profile p* is the
combination sum_i x_i snapshot_i whose profile sum_i x_i p_i is closest to p* in L2 on [0, inf):

    A x = b,   A_ij = <p_i, p_j>,   b_i = <p_i, p*>                                           (2)

with the closed form, for t_a <= t_b,

    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * t_a^gamma_b / t_b^(gamma_b + 1).   (3)

(2) is solved on the diagonally scaled system by least squares (near-duplicate profiles make A ill-conditioned;
the minimum-norm solution is taken). `residual` is ||sum x_i p_i - p*||^2 / ||p*||^2: 0 when p* is one of the
snapshots' profiles, small when the snapshots are dense enough and the wanted width lies within or near the
tracked ones. Written from the paper's description; time is counted in samples seen.

    python -m phenoflow.train.posthoc_ema runs/X --std 0.03 [--at SAMPLES]
writes runs/X/export/posthoc/ema-0.0300.safetensors (safetensors metadata: the coefficients and residual).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from phenoflow.train.ema import std_to_gamma
from phenoflow.train.snapshots import list_snapshots, load_snapshot, snapshot_profile


def profile_inner(t_a, g_a, t_b, g_b) -> np.ndarray:
    """(3) for arrays (broadcast): the L2 inner product of two power-function profiles."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    short = t_a <= t_b
    t_lo, t_hi = np.where(short, t_a, t_b), np.where(short, t_b, t_a)
    g_hi = np.where(short, g_b, g_a)  # exponent of the profile that reaches further
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (t_lo / t_hi) ** g_hi / t_hi


def solve_coefficients(times, gammas, t_target: float, g_target: float) -> tuple[np.ndarray, float]:
    """(x, residual): coefficients of the snapshot profiles (times[i], gammas[i]) whose combination is closest
    to the profile (t_target, g_target), and the relative squared L2 error of that combination (2)."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if t.size == 0 or t.shape != g.shape:
        raise ValueError(f"need matching, non-empty snapshot times and exponents, got {t.shape} and {g.shape}")
    if (t <= 0).any() or t_target <= 0:
        raise ValueError("snapshot and target times must be > 0")
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, t_target, g_target)
    c = float(profile_inner(t_target, g_target, t_target, g_target))
    d = 1.0 / np.sqrt(np.diag(A))
    y, *_ = np.linalg.lstsq(A * d[:, None] * d[None, :], b * d, rcond=1e-12)
    x = y * d
    residual = float((x @ A @ x - 2 * x @ b + c) / c)
    return x, max(residual, 0.0)


def reconstruct(run_dir: str | Path, std: float, at: int | None = None,
                use_stds: list[float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of width `std` at `at` samples (default: the last snapshot) from the run's snapshots up to
    `at`, using the profiles of `use_stds` (default: every tracked width). Returns (float32 state dict, info:
    coefficients per (samples, std), residual). Integer tensors are taken from the newest snapshot used."""
    snaps = list_snapshots(run_dir)
    if at is not None:
        snaps = [(s, p) for s, p in snaps if s <= at]
    if not snaps:
        raise FileNotFoundError(f"no snapshots in {Path(run_dir) / 'checkpoints' / 'snapshots'}"
                                f"{f' up to {at} samples' if at is not None else ''}: train with train.snapshots=true")
    t_target = at if at is not None else snaps[-1][0]
    last = load_snapshot(snaps[-1][1])
    stds = [float(s) for s in (use_stds or last["stds"])]
    terms = [(samples, path, s) for samples, path in snaps for s in stds]
    x, residual = solve_coefficients([s for s, _, _ in terms], [std_to_gamma(s) for _, _, s in terms],
                                     float(t_target), std_to_gamma(std))
    out: dict[str, torch.Tensor] = {}
    by_path: dict[Path, list[tuple[float, float]]] = {}
    for (samples, path, s), coef in zip(terms, x):
        by_path.setdefault(path, []).append((s, float(coef)))
    for path, pairs in by_path.items():
        state = last if path == snaps[-1][1] else load_snapshot(path)
        for s, coef in pairs:
            for name, tensor in snapshot_profile(state, s).items():
                if not tensor.is_floating_point():
                    continue
                acc = out.get(name)
                if acc is None:
                    out[name] = acc = torch.zeros(tensor.shape, dtype=torch.float64)
                acc.add_(tensor.double(), alpha=coef)
    result = {n: v.float() for n, v in out.items()}
    for name, tensor in snapshot_profile(last, stds[0]).items():
        if not tensor.is_floating_point():
            result[name] = tensor.clone()
    info = {"std": float(std), "at_samples": int(t_target), "residual": residual, "use_stds": stds,
            "coefficients": [{"samples": int(s), "std": float(sd), "coef": float(c)} for (s, _, sd), c in zip(terms, x)]}
    return result, info


def export_posthoc(run_dir: str | Path, std: float, at: int | None = None, use_stds: list[float] | None = None,
                   out: str | Path | None = None) -> Path:
    """Reconstruct and write run_dir/export/posthoc/ema-<std>.safetensors (info in its metadata)."""
    from phenoflow.train.checkpoint import ema_filename, save_safetensors

    state, info = reconstruct(run_dir, std, at, use_stds)
    path = Path(out) if out else Path(run_dir) / "export" / "posthoc" / ema_filename(std)
    return save_safetensors(state, path, metadata={"posthoc_ema": json.dumps(info)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phenoflow.train.posthoc_ema", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder with checkpoints/snapshots/")
    p.add_argument("--std", type=float, required=True, help="wanted EMA width (relative std, e.g. 0.03)")
    p.add_argument("--at", type=int, default=None, help="samples seen (default: the last snapshot)")
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/export/posthoc/ema-<std>.safetensors)")
    a = p.parse_args(argv)
    path = export_posthoc(a.run_dir, a.std, a.at, out=a.out)
    print(f"post-hoc EMA std {a.std} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
