"""Generation for evaluation: exactly one generated image per real image, with the same labels.

Noise is deterministic per sample: each sample's N(0, I) source is drawn from a generator seeded by a hash of
(seed, sample key), so the result does not depend on batch size, order, or how samples are split over ranks.

Modes:
  generate        x(0) ~ N(0, I), solve t: 0 -> 1 with the sample's labels and guidance w.
  counterfactual  start from a control image of the same experiment (picked deterministically by the same
                  hash), solve back t: 1 -> 0 with the control's own labels (w = 1, no guidance), then forward
                  t: 0 -> 1 with the target labels and guidance w (ARCHITECTURE.md section 3).
  control         (Config A of the MiT paper: a flow.coupling=control model, control -> perturbed)
                  x(0) = encode(c) + control_noise * z, c a control image of the same experiment (the pick of
                  counterfactual mode), z the per-key noise of generate mode; then t: 0 -> 1 with the target
                  labels and guidance w. The noise is always added at sampling (training adds it with probability
                  flow.control_noise_prob, as in CellFlux).
NFE is the number of solver evaluations of the velocity field per batch (mean over batches); each evaluation is
two network forwards (batched as one of size 2B) when w is not 0 or 1.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phenoflow.flow.guidance import make_velocity_fn
from phenoflow.flow.solvers import counterfactual, integrate

LABEL_KEYS = ("perturbation", "experiment", "cell_type")
META_KEYS = ("dose", "is_control")


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from (seed, sample key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(B, *shape) float32 standard normal noise, row i determined by (seed, keys[i]) only."""
    g = torch.Generator()
    out = torch.empty(len(keys), *shape)
    for i, k in enumerate(keys):
        g.manual_seed(sample_seed(seed, k))
        out[i] = torch.randn(shape, generator=g)
    return out


def decode(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (x * 127.5 + 128, clipped; the batch format's decoding)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def encode(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def forwards_per_eval(w: float) -> int:
    return 1 if w in (0.0, 1.0) else 2


class ControlPool:
    """Control images per experiment, for counterfactual and control generation (the eval split's controls)."""

    def __init__(self) -> None:
        self.images: dict[int, list[torch.Tensor]] = {}
        self.labels: dict[int, list[dict[str, int]]] = {}

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        for i in torch.nonzero(batch["is_control"]).flatten().tolist():
            e = int(batch["experiment"][i])
            self.images.setdefault(e, []).append(batch["image"][i].cpu())
            self.labels.setdefault(e, []).append({k: int(batch[k][i]) for k in LABEL_KEYS})

    def pick(self, experiment: int, key: str, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
        if experiment not in self.images:
            raise ValueError(f"counterfactual/control generation: no control image for experiment index {experiment} "
                             f"(experiments with controls: {sorted(self.images)})")
        j = sample_seed(seed + 1, key) % len(self.images[experiment])
        return self.images[experiment][j], self.labels[experiment][j]


@torch.no_grad()
def generate(model: torch.nn.Module, loader_batches: Iterable[Mapping[str, Any]], eval_cfg: Any, w: float,
             device: str | torch.device = "cpu", seed: int = 0, mode: str = "generate",
             controls: ControlPool | None = None, max_images: int = 0, progress: bool = False,
             control_noise: float = 0.0) -> tuple[torch.Tensor, dict[str, Any], float]:
    """One generated image per real image of `loader_batches`, with the same labels.

    mode: generate | counterfactual | control (module docstring); controls: the ControlPool of the last two.
    control_noise: control mode's noise std (cfg.flow.control_noise), always added at sampling (training adds it
    with probability flow.control_noise_prob, CellFlux).

    Returns (images uint8 (N, C, H, W) on CPU, labels {perturbation, experiment, cell_type: int64 (N,),
    dose: float32, is_control: bool, key: list[str]}, NFE = mean solver evaluations per batch).
    """
    if mode not in ("generate", "counterfactual", "control"):
        raise ValueError(f"generation mode {mode!r} is not 'generate', 'counterfactual' or 'control'")
    if mode in ("counterfactual", "control") and controls is None:
        raise ValueError(f"{mode} generation needs a ControlPool of control images (controls=)")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    groups = tuple(eval_cfg.guidance_groups)
    solve = {"method": eval_cfg.solver, "rtol": eval_cfg.rtol, "atol": eval_cfg.atol, "steps": eval_cfg.steps}
    images, nfes, seen = [], [], 0
    labels_out: dict[str, list] = {k: [] for k in LABEL_KEYS + META_KEYS + ("key",)}
    it = loader_batches
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"generate w={w}", unit="batch", leave=False)
    for batch in it:
        keys = list(batch["key"])
        n = len(keys) if not max_images else min(len(keys), max_images - seen)
        if n <= 0:
            break
        keys = keys[:n]
        labels = {k: batch[k][:n].to(device) for k in LABEL_KEYS}
        if getattr(model, "mol_adaptor", None) is not None:  # the molecule adaptor is dose-modulated
            labels["dose"] = batch["dose"][:n].to(device, torch.float32)
        shape = tuple(batch["image"].shape[1:])
        if mode in ("generate", "control"):
            x0 = sample_noise(keys, shape, seed)
            if mode == "control":  # a control of the sample's experiment + control_noise * the same per-key noise
                src = torch.stack([controls.pick(int(e), k, seed)[0] for e, k in
                                   zip(batch["experiment"][:n].tolist(), keys)])
                x0 = encode(src).reshape(x0.shape) + float(control_noise) * x0
            x0 = x0.to(device)
            x1, nfe = integrate(make_velocity_fn(model, labels, w, groups), x0, 0.0, 1.0, **solve)
        else:
            picks = [controls.pick(int(e), k, seed) for e, k in zip(batch["experiment"][:n].tolist(), keys)]
            src_img = torch.stack([p[0] for p in picks]).to(device)
            src_labels = {g: torch.tensor([p[1][g] for p in picks], device=device) for g in LABEL_KEYS}
            x1, nfe = counterfactual(make_velocity_fn(model, src_labels, 1.0, groups),
                                     make_velocity_fn(model, labels, w, groups), encode(src_img), **solve)
        images.append(decode(x1).cpu())
        nfes.append(nfe)
        for k in LABEL_KEYS + META_KEYS:
            labels_out[k].append(batch[k][:n].cpu())
        labels_out["key"] += keys
        seen += n
        if max_images and seen >= max_images:
            break
    model.train(was_training)
    if not images:
        raise ValueError("generate: the loader yielded no samples")
    out_labels: dict[str, Any] = {k: torch.cat(v) for k, v in labels_out.items() if k != "key"}
    out_labels["key"] = labels_out["key"]
    return torch.cat(images), out_labels, float(np.mean(nfes))


def save_samples(path: str | Path, images: torch.Tensor, labels: Mapping[str, Any],
                 names: Mapping[str, list[str]] | None = None, **meta: Any) -> Path:
    """Save generated images + labels (+ scalar metadata such as w, nfe) as .npz, to recompute metrics.

    names {group: vocabulary}: also store each image's label NAME as `<group>_name` (a string array; "null" for
    an id outside the vocabulary). Written atomically (phenoflow.train.checkpoint._atomic: temp file, fsync,
    rename)."""
    from phenoflow.train.checkpoint import _atomic

    path = Path(path)
    arrays = {"images": images.numpy()}
    for k, v in labels.items():
        arrays[k] = np.asarray(v if k == "key" else v.numpy())
        if names and names.get(k) and k != "key":
            vocab = names[k]
            arrays[f"{k}_name"] = np.asarray([vocab[i] if 0 <= i < len(vocab) else "null"
                                              for i in np.asarray(v).reshape(len(v), -1)[:, 0].tolist()], dtype=str)
    for k, v in meta.items():
        arrays[f"meta_{k}"] = np.asarray(v)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temp file's name
            np.savez_compressed(f, **arrays)

    return _atomic(path, write)


def load_samples(path: str | Path) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """Inverse of save_samples -> (images uint8, labels, meta)."""
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z.files:
            raise ValueError(f"{path}: not a samples file (no 'images' array)")
        images = torch.from_numpy(z["images"])
        labels: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for k in z.files:
            if k == "images":
                continue
            if k.startswith("meta_"):
                meta[k[5:]] = z[k].item() if z[k].ndim == 0 else z[k]
            elif k == "key" or z[k].dtype.kind == "U":  # sample keys, label names
                labels[k] = [str(s) for s in z[k]]
            else:
                labels[k] = torch.from_numpy(z[k])
    return images, labels, meta
