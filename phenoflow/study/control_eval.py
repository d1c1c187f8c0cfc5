"""Sampling a control -> perturbed model (Config A, flow.coupling=control): x0 = encode(c) + flow.control_noise * z,
c a control image of the target's experiment from the eval split (picked per sample key as counterfactual
generation picks it), z the per-key N(0, I) noise of ordinary generation; then t: 0 -> 1 with the target labels
and guidance w. The noise is always added at sampling (CellFlux: training adds it with probability
flow.control_noise_prob).

phenoflow.eval.generate has no such source mode yet; until it has, `control_source_sampling` swaps its per-key
noise function for this one for the duration of one evaluate() call (same batches, features and metrics).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from phenoflow.config import Config


def _eval_split_controls(cfg: Config, data_dir: Path):
    from phenoflow.data.loader import ShardLoader
    from phenoflow.eval.generate import ControlPool

    loader = ShardLoader(data_dir, cfg.eval.split, cfg.eval.batch_size, seed=0, shuffle=False, drop_last=False,
                         infinite=False, bad_sample_policy=cfg.data.bad_sample_policy, checksums=cfg.data.checksums)
    pool, experiment_of = ControlPool(), {}
    for b in loader:
        pool.add_batch(b)
        for k, e in zip(b["key"], b["experiment"].tolist()):
            experiment_of[k] = int(e)
    return pool, experiment_of


@contextmanager
def control_source_sampling(cfg: Config, data_dir: Path) -> Iterator[None]:
    import phenoflow.eval.generate as gen_mod
    from phenoflow.data.transforms import encode

    pool, experiment_of = _eval_split_controls(cfg, data_dir)
    original = gen_mod.sample_noise
    std = float(cfg.flow.control_noise)

    def control_plus_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
        c = torch.stack([pool.pick(experiment_of[k], k, seed)[0] for k in keys])
        return encode(c).float().reshape(len(keys), *shape) + std * original(keys, shape, seed)

    gen_mod.sample_noise = control_plus_noise
    try:
        yield
    finally:
        gen_mod.sample_noise = original
