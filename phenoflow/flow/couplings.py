"""Couplings: how source samples x0 are paired with the data batch x1.

- independent: x0 ~ N(0, I), paired as drawn (the MiT default).
- ot: minibatch optimal transport (Pooladian et al. 2023, Tong et al. 2023): noise and data of one batch are
  re-paired by the exact assignment minimising the total squared Euclidean distance (POT's network simplex).
- control: the paper's Config A; the source is a control image from the same experiment plus Gaussian noise,
  x0 = c + noise_std * z, so the flow learns control -> perturbed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ot
import torch
from torch import Tensor


def _randn(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0, I) drawn on the generator's device (CPU generators work for CUDA tensors), in like's dtype/device."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def independent(x0: Tensor, x1: Tensor) -> Tensor:
    """Independent coupling: x0[i] stays paired with x1[i]."""
    return x0


def minibatch_ot(x0: Tensor, x1: Tensor) -> Tensor:
    """Re-order x0 so that (x0[i], x1[i]) is the exact OT pairing of the batch.

    cost      C_ij = ||x0_i - x1_j||^2            (flattened, float64)
    plan      P = argmin_{P in U(a, b)} <P, C>,  a = b = 1/n (uniform weights)
    For equal batch sizes P is (1/n) times a permutation matrix, so each column j holds one source i(j).
    """
    if x0.shape != x1.shape:
        raise ValueError(f"minibatch_ot needs x0 and x1 of equal shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    n = x0.shape[0]
    a = x0.detach().flatten(1).double().cpu()
    b = x1.detach().flatten(1).double().cpu()
    cost = torch.cdist(a, b).pow(2).numpy()
    w = np.full(n, 1.0 / n)
    plan = ot.emd(w, w, cost)
    src = plan.argmax(axis=0)  # src[j] = index of x0 paired with x1[j]
    if not np.array_equal(np.sort(src), np.arange(n)) or not np.allclose(plan[src, np.arange(n)], 1.0 / n):
        raise RuntimeError("minibatch_ot: POT returned a plan that is not a permutation (did emd converge?)")
    return x0[torch.as_tensor(src, device=x0.device)]


def control_source(control_images: Tensor, noise_std: float, generator: torch.Generator | None = None,
                   prob: float = 1.0) -> Tensor:
    """Config A source: x0 = c + m * noise_std * z, z ~ N(0, I), c an encoded control image ([-1, 1] floats).

    m = 1 when prob = 1 (every source noised); else m_i ~ Bernoulli(prob) per sample, drawn after z from the same
    generator (CellFlux's augmentation: N(0, 1) added with probability 0.5 in training, always at sampling)."""
    if noise_std < 0:
        raise ValueError(f"control noise_std={noise_std} must be >= 0")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"control noise prob={prob} must be in [0, 1]")
    z = _randn(control_images.shape, generator, control_images)
    if prob < 1.0:
        dev = generator.device if generator is not None else control_images.device
        m = torch.rand(control_images.shape[0], generator=generator, device=dev) < prob
        z = z * m.to(z).view(-1, *([1] * (z.dim() - 1)))
    return control_images + noise_std * z


def pick_controls(experiment_ids_of_batch: Tensor | Sequence[int], control_pool_by_experiment: Mapping[int, Tensor],
                  generator: torch.Generator | None = None, experiment_names: Sequence[str] | None = None) -> Tensor:
    """For each sample, a control drawn uniformly (with replacement) from the pool of the same experiment.

    control_pool_by_experiment: {experiment index: controls (N_e, ...)}. Returns (B, ...) stacked controls.
    Experiments are visited in sorted order so the draw is deterministic given the generator.
    A sample whose experiment has no controls raises ValueError naming the experiment.
    """
    ids = torch.as_tensor(experiment_ids_of_batch).long().cpu()
    out: list[Tensor | None] = [None] * len(ids)
    for e in sorted(set(ids.tolist())):
        pool = control_pool_by_experiment.get(e)
        if pool is None or len(pool) == 0:
            name = f" ({experiment_names[e]!r})" if experiment_names is not None and e < len(experiment_names) else ""
            have = sorted(k for k, v in control_pool_by_experiment.items() if len(v))
            raise ValueError(f"experiment {e}{name} has no control images in the control pool "
                             f"(experiments with controls: {have})")
        rows = (ids == e).nonzero().flatten()
        pick = torch.randint(len(pool), (len(rows),), generator=generator, device=generator.device if generator else None)
        for r, p in zip(rows.tolist(), pick.cpu().tolist()):
            out[r] = pool[p]
    return torch.stack(out)  # type: ignore[arg-type]


class Coupling:
    """x1 (data batch) -> x0 (source batch, same shape), per flow.coupling.

    independent / ot draw x0 ~ N(0, I) with `generator`; control needs `controls` (B, ...) of encoded control
    images, one per sample (see pick_controls), and adds N(0, noise_std^2) noise.
    """

    def __init__(self, kind: str = "independent", control_noise: float = 0.1, control_noise_prob: float = 1.0):
        if kind not in ("independent", "ot", "control"):
            raise ValueError(f"flow.coupling={kind!r} is not one of ['independent', 'ot', 'control']")
        self.kind, self.control_noise = kind, float(control_noise)
        self.control_noise_prob = float(control_noise_prob)
        self.needs_controls = kind == "control"

    def __call__(self, x1: Tensor, generator: torch.Generator | None = None, controls: Tensor | None = None) -> Tensor:
        if self.kind == "control":
            if controls is None or controls.shape != x1.shape:
                got = None if controls is None else tuple(controls.shape)
                raise ValueError(f"flow.coupling=control needs controls of shape {tuple(x1.shape)}, got {got}")
            return control_source(controls.to(x1.dtype), self.control_noise, generator, self.control_noise_prob)
        x0 = _randn(x1.shape, generator, x1)
        return minibatch_ot(x0, x1) if self.kind == "ot" else independent(x0, x1)


def build_coupling(flow_cfg: Any) -> Coupling:
    """FlowConfig -> Coupling (flow.coupling, flow.control_noise, flow.control_noise_prob)."""
    return Coupling(flow_cfg.coupling, flow_cfg.control_noise, getattr(flow_cfg, "control_noise_prob", 1.0))
