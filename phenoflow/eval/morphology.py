"""Weight-free morphology features computed from the images themselves.

No network and no weights: every feature is a plain, interpretable image statistic, so the embedded demo has a
meaningful metric (FD/KD on these features, "FD_morph"/"KD_morph") that runs offline on CPU.

Images are (N, C, H, W), uint8 [0, 255] or float on [-1, 1]; they are mapped to intensities u on [0, 1]
(u = (x + 1) / 2, clamped). Channel 0 is the nuclear (DNA / Hoechst) channel for 6- and 3-channel data.

Features, per channel c (names `ch{c}_<stat>`, channels counted from 0):
  mean, std            mean and standard deviation of u over the image
  q10, q50, q90, q99   intensity quantiles
  grad_energy          mean squared forward difference, mean over x and y: mean((du/dx)^2 + (du/dy)^2) / 2
  contrast_d2          Haralick-like contrast at distance 2, without grey-level quantisation:
                       mean of (u(p) - u(p + 2 e))^2 over horizontal and vertical offsets e
  nuc_mean, bg_mean    mean of u inside the nucleus mask and outside it (0 when the region is empty)
Nucleus features (from a simple segmentation of channel 0), names `nuc_<stat>`:
  area_frac            fraction of the image covered by nuclei
  count                number of nuclei (4-connected components of the mask with >= min_size pixels)
  mean_size            mean nucleus area in pixels (0 when there is none)
  eccentricity         mean eccentricity sqrt(1 - l2 / l1) of the nuclei, l1 >= l2 the eigenvalues of each
                       component's second-moment (coordinate covariance) matrix, +1/12 per axis for the
                       pixels' own extent so a single pixel is round (0 when there is none)
  threshold            the threshold used (below)
Segmentation: channel 0 smoothed by a 3x3 box filter, thresholded at max(Otsu's threshold of the image
(64-bin histogram), floor); components smaller than min_size pixels are dropped from the mask.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

CHANNEL_STATS = ("mean", "std", "q10", "q50", "q90", "q99", "grad_energy", "contrast_d2", "nuc_mean", "bg_mean")
NUCLEUS_STATS = ("area_frac", "count", "mean_size", "eccentricity", "threshold")
QUANTILES = (0.10, 0.50, 0.90, 0.99)


def feature_names(channels: int) -> list[str]:
    """Names of the morphology features for `channels`-channel images, in column order."""
    per_channel = [f"ch{c}_{s}" for s in CHANNEL_STATS for c in range(channels)]
    return per_channel + [f"nuc_{s}" for s in NUCLEUS_STATS]


def _intensity(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return ((x.float() + 1) / 2).clamp(0, 1)


def otsu_threshold(u: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each image in u (B, H, W) on [0, 1] -> (B,): maximises the between-class variance."""
    b = u.shape[0]
    idx = (u.reshape(b, -1) * bins).long().clamp(0, bins - 1)
    hist = torch.zeros(b, bins, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = hist / hist.sum(1, keepdim=True)
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = p.cumsum(1)  # weight of the class below each cut (cut after bin k)
    m0 = (p * centers).cumsum(1)  # first moment below the cut
    mt = m0[:, -1:]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)  # sigma_B^2 = (mt w0 - m0)^2 / (w0 w1)
    k = between[:, :-1].argmax(1)
    return ((k + 1).double() / bins).float()  # threshold at the upper edge of bin k


def _nucleus_stats(mask: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of mask (B, H, W) -> (per-image [area_frac, count, mean_size, eccentricity], cleaned mask)."""
    b, h, w = mask.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity within an image, none across images
    labels, n = ndimage.label(mask, structure=structure)
    out = np.zeros((b, 4), dtype=np.float64)
    if n == 0:
        return out, mask
    flat = labels.ravel()
    img, yy, xx = np.indices((b, h, w)).reshape(3, -1).astype(np.float64)
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    keep = area >= min_size
    # Moments of each component: sums of 1, y, x, y^2, x^2, xy and the image it belongs to.
    sums = [np.bincount(flat, weights=v, minlength=n + 1)[1:] for v in (yy, xx, yy * yy, xx * xx, yy * xx, img)]
    sy, sx, syy, sxx, sxy, simg = (s / area for s in sums)
    vy = syy - sy**2 + 1 / 12  # coordinate variances (+1/12: a pixel's own extent)
    vx = sxx - sx**2 + 1 / 12
    cxy = sxy - sy * sx
    half_tr, det_term = (vy + vx) / 2, np.sqrt(((vy - vx) / 2) ** 2 + cxy**2)
    l1, l2 = half_tr + det_term, np.maximum(half_tr - det_term, 0.0)
    ecc = np.sqrt(np.clip(1 - l2 / l1, 0.0, 1.0))
    owner = np.rint(simg).astype(np.int64)  # every pixel of a component lies in one image
    k_owner, k_area, k_ecc = owner[keep], area[keep], ecc[keep]
    count = np.bincount(k_owner, minlength=b).astype(np.float64)
    total = np.bincount(k_owner, weights=k_area, minlength=b)
    ecc_sum = np.bincount(k_owner, weights=k_ecc, minlength=b)
    safe = np.maximum(count, 1)
    out[:, 0] = total / (h * w)
    out[:, 1] = count
    out[:, 2] = np.where(count > 0, total / safe, 0.0)
    out[:, 3] = np.where(count > 0, ecc_sum / safe, 0.0)
    keep_label = np.concatenate([[False], keep])
    return out, keep_label[labels]


@torch.no_grad()
def _chunk_features(x: torch.Tensor, min_size: int, floor: float) -> torch.Tensor:
    u = _intensity(x)  # (B, C, H, W) on [0, 1]
    flat = u.flatten(2)
    mean, std = flat.mean(-1), flat.std(-1, unbiased=False)
    q = torch.quantile(flat, torch.tensor(QUANTILES), dim=-1)  # (Q, B, C)
    dx, dy = u[..., :, 1:] - u[..., :, :-1], u[..., 1:, :] - u[..., :-1, :]
    grad = (dx.pow(2).mean((-2, -1)) + dy.pow(2).mean((-2, -1))) / 2
    d2x, d2y = u[..., :, 2:] - u[..., :, :-2], u[..., 2:, :] - u[..., :-2, :]
    contrast = (d2x.pow(2).mean((-2, -1)) + d2y.pow(2).mean((-2, -1))) / 2
    # Nucleus segmentation on channel 0: 3x3 box smoothing, threshold max(Otsu, floor), small components dropped.
    nuc = F.avg_pool2d(F.pad(u[:, :1], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    thr = otsu_threshold(nuc).clamp_min(floor)
    raw_mask = (nuc > thr[:, None, None]).numpy()
    nstats, mask_np = _nucleus_stats(raw_mask, min_size)
    m = torch.from_numpy(mask_np).to(u.dtype)[:, None]  # (B, 1, H, W)
    n_in, n_out = m.sum((-2, -1)), (1 - m).sum((-2, -1))
    nuc_mean = torch.where(n_in > 0, (u * m).sum((-2, -1)) / n_in.clamp_min(1), torch.zeros_like(mean))
    bg_mean = torch.where(n_out > 0, (u * (1 - m)).sum((-2, -1)) / n_out.clamp_min(1), torch.zeros_like(mean))
    per_channel = torch.cat([mean, std, *q, grad, contrast, nuc_mean, bg_mean], dim=1)  # stat-major, channel-minor
    nucleus = torch.cat([torch.from_numpy(nstats), thr.double()[:, None]], dim=1)
    return torch.cat([per_channel.double(), nucleus], dim=1)


def morphology_features(images: torch.Tensor, batch_size: int = 256, min_size: int = 3,
                        floor: float = 0.1) -> tuple[torch.Tensor, list[str]]:
    """Morphology features of (N, C, H, W) images (uint8 or float on [-1, 1]) -> ((N, F) float64, names)."""
    if images.ndim != 4:
        raise ValueError(f"morphology_features expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    names = feature_names(images.shape[1])
    if images.shape[0] == 0:
        return torch.zeros(0, len(names), dtype=torch.float64), names
    chunks = [_chunk_features(images[i:i + batch_size].cpu(), min_size, floor)
              for i in range(0, images.shape[0], batch_size)]
    feats = torch.cat(chunks)
    assert feats.shape[1] == len(names)
    return feats, names
