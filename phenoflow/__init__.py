"""phenoflow: flow-matching generative models of perturbed cells (microscopy images and single-cell expression).

    import phenoflow
    m = phenoflow.load("runs/NAME")          # a run folder or an export folder
    images = m.sample(perturbation="gene_01", n=16, guidance=2.0)

`load` is imported on first use (phenoflow.api), so `import phenoflow` stays light.
"""
from __future__ import annotations

__all__ = ["load"]


def load(path, ema_std=None, device=None, overrides=None):
    """A trained model from a run folder or an export folder (phenoflow.api.load; see phenoflow.api.Model)."""
    from phenoflow.api import load as _load

    return _load(path, ema_std=ema_std, device=device, overrides=overrides)
