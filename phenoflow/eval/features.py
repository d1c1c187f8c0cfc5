"""Feature extractors by name: "morphology" (weight-free), "inception" (FID network), "dinov2" (ViT-L/14).

`extract(name, images, eval_cfg, device)` maps uint8 (N, C, H, W) images (C = 3 or 6) to (N, F) float64 features.
RGB networks see the 6 -> 3 projection of phenoflow.eval.project. Networks load their weights from the local
path in the eval config (eval.inception_weights / eval.dinov2_weights), else the file imported with
`phenoflow weights import` (phenoflow.eval.weights_import); nothing is downloaded.
"""
from __future__ import annotations

from typing import Any

import torch

from phenoflow.eval.morphology import morphology_features

FEATURE_SETS = ("morphology", "inception", "dinov2")


class FeatureUnavailable(RuntimeError):
    """A feature set that cannot be computed here (e.g. no weights file configured); the message says why."""


def weights_path(name: str, eval_cfg: Any) -> str:
    """eval.<name>_weights, or when empty the file `phenoflow weights import <name> FILE` wrote to the weights
    folder (phenoflow.eval.weights_import.default_path); FeatureUnavailable saying how to get one otherwise."""
    path = {"inception": eval_cfg.inception_weights, "dinov2": eval_cfg.dinov2_weights}.get(name, "")
    if not path:
        from phenoflow.eval.weights_import import PUBLISHED, default_path

        imported = default_path(name)
        if imported.is_file():
            return str(imported)
        raise FeatureUnavailable(f"eval.{name}_weights is not set and no imported file is at {imported} (nothing "
                                 f"is downloaded: get {PUBLISHED[name].file_name} and run `phenoflow weights import "
                                 f"{name} FILE`, see docs/eval.md)")
    return path


_NETWORKS: dict[tuple[str, str, str], torch.nn.Module] = {}


def _network(name: str, eval_cfg: Any, device: torch.device) -> torch.nn.Module:
    """Build and cache the feature network for `name` from its local weights file."""
    path = weights_path(name, eval_cfg)
    key = (name, path, str(device))
    if key not in _NETWORKS:
        if name == "inception":
            from phenoflow.eval.inception import load_inception

            net = load_inception(path)
        else:
            from phenoflow.eval.dinov2 import load_dinov2

            net = load_dinov2(path)
        _NETWORKS[key] = net.to(device).eval()
    return _NETWORKS[key]


@torch.no_grad()
def _network_features(net: torch.nn.Module, images: torch.Tensor, device: torch.device,
                      batch_size: int, desc: str = "features", progress: bool = True) -> torch.Tensor:
    from phenoflow.eval.project import project_to_rgb
    from phenoflow.progress import Progress

    out = []
    with Progress(images.shape[0], desc, "images", enabled=progress) as bar:
        for i in range(0, images.shape[0], batch_size):
            rgb = project_to_rgb(images[i:i + batch_size].to(device))  # (B, 3, H, W) on [0, 1]
            out.append(net(rgb).double().cpu())
            bar.update(rgb.shape[0])
    return torch.cat(out)


def extract(name: str, images: torch.Tensor, eval_cfg: Any, device: str | torch.device = "cpu",
            batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """(N, C, H, W) uint8 images -> (N, F) float64 features of the named set. Networks show their progress on
    stderr (a bar on a terminal, periodic lines elsewhere: phenoflow.progress) unless `progress` is False."""
    if name not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {name!r} (known: {list(FEATURE_SETS)})")
    if name == "morphology":
        return morphology_features(images)[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        progress = progress and torch.distributed.get_rank() == 0  # one progress display per job
    return _network_features(_network(name, eval_cfg, torch.device(device)), images, torch.device(device),
                             batch_size, f"{name} features", progress)
