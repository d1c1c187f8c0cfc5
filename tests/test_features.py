"""6 -> RGB projection and the weight-free morphology features on images built here with known content."""
import numpy as np
import pytest
import torch

from phenoflow.eval.morphology import feature_names, morphology_features, otsu_threshold
from phenoflow.eval.project import DEFAULT_WEIGHTS, project_to_rgb


def test_projection_of_unit_vectors():
    # Channel c at +1 and every other channel at 0 (on [-1, 1]) -> rgb = clamp(w_c) mapped to [0, 1].
    for c in range(6):
        x = torch.zeros(1, 6, 2, 2)
        x[0, c] = 1.0
        rgb = project_to_rgb(x)[0, :, 0, 0]
        want = (torch.tensor(DEFAULT_WEIGHTS[c]).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(rgb, want)
    # Named cases: ch1 -> blue, ch3 -> red, ch4 -> half green + half blue.
    x = torch.zeros(3, 6, 1, 1)
    x[0, 0], x[1, 2], x[2, 3] = 1, 1, 1
    torch.testing.assert_close(project_to_rgb(x)[:, :, 0, 0],
                               torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.5, 0.5], [0.5, 0.75, 0.75]]))
    # All channels at -1 (black) clamp to 0; all at +1 clamp to 1.
    assert project_to_rgb(-torch.ones(1, 6, 1, 1)).eq(0).all() and project_to_rgb(torch.ones(1, 6, 1, 1)).eq(1).all()


def test_projection_rgb_passthrough_uint8_and_custom_weights():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(project_to_rgb(x)[0, :, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    w = [[1, 0, 0]] * 2  # 2 channels, both to red
    y = project_to_rgb(torch.full((1, 2, 1, 1), 0.25), weights=w)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.75, 0.5, 0.5]))
    with pytest.raises(ValueError, match="no default projection for 4 channels"):
        project_to_rgb(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"expected \(6, 3\)"):
        project_to_rgb(torch.zeros(1, 6, 2, 2), weights=w)


def _cells(n, size, radius, count, channels=6, aspect=1.0, seed=0):
    """n uint8 images with `count` ellipses (semi-axes radius*aspect, radius) in channel 0 at random positions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.zeros((n, channels, size, size), dtype=np.float64)
    imgs[:, 1:] = rng.uniform(0.1, 0.3, (n, channels - 1, 1, 1))  # flat other channels
    cells = size // 2
    for i in range(n):
        for j in range(count):  # one cell per quadrant-like slot, no overlaps
            cy = (j // 2) * cells + cells // 2 + rng.integers(-2, 3)
            cx = (j % 2) * cells + cells // 2 + rng.integers(-2, 3)
            inside = ((xx - cx) / (radius * aspect)) ** 2 + ((yy - cy) / radius) ** 2 <= 1
            imgs[i, 0][inside] = 0.8
    imgs[:, 0] += rng.normal(0, 0.02, imgs[:, 0].shape)
    return torch.from_numpy(np.clip(imgs * 255, 0, 255).astype(np.uint8))


def _col(feats, names, name):
    return feats[:, names.index(name)]


def test_morphology_recovers_nucleus_size_count_and_shape():
    small, names = morphology_features(_cells(8, 48, 4, 4))
    large, _ = morphology_features(_cells(8, 48, 7, 4, seed=1))
    two, _ = morphology_features(_cells(8, 48, 4, 2, seed=2))
    long, _ = morphology_features(_cells(8, 48, 4, 4, aspect=2.0, seed=3))
    assert small.dtype == torch.float64 and small.shape == (8, len(names)) == (8, len(feature_names(6)))
    # Larger disks -> larger nucleus area fraction and mean size, same count.
    assert (_col(large, names, "nuc_area_frac") > _col(small, names, "nuc_area_frac")).all()
    assert _col(large, names, "nuc_mean_size").mean() > 2 * _col(small, names, "nuc_mean_size").mean()
    assert (_col(small, names, "nuc_count") == 4).all() and (_col(large, names, "nuc_count") == 4).all()
    assert (_col(two, names, "nuc_count") == 2).all()
    # Area of a radius-4 disk ~ pi 16 ~ 50 px; a 2:1 ellipse of semi-axes (8, 4) has eccentricity sqrt(3)/2.
    assert _col(small, names, "nuc_mean_size").mean() == pytest.approx(np.pi * 16, rel=0.25)
    assert _col(small, names, "nuc_eccentricity").mean() < 0.35
    assert _col(long, names, "nuc_eccentricity").mean() == pytest.approx(np.sqrt(3) / 2, abs=0.08)
    # Intensity features see the nuclei: inside-mask mean of channel 0 near 0.8 (the smoothed mask takes in part of
    # the rim), background near 0; the other channels are flat, so their inside and outside means agree.
    assert 0.6 < _col(small, names, "ch0_nuc_mean").mean() <= 0.8
    assert _col(small, names, "ch0_bg_mean").mean() < 0.1
    torch.testing.assert_close(_col(small, names, "ch3_nuc_mean"), _col(small, names, "ch3_bg_mean"), atol=0.01, rtol=0)


def test_morphology_float_input_chunking_and_rgb():
    imgs = _cells(5, 32, 5, 4, channels=3)
    a, names = morphology_features(imgs)
    b, _ = morphology_features(imgs.float() / 127.5 - 1, batch_size=2)  # [-1, 1] floats, other chunking
    torch.testing.assert_close(a, b, rtol=0, atol=0.02)
    assert len(names) == 3 * 10 + 5 and names[0] == "ch0_mean"
    empty, _ = morphology_features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))  # no nuclei at all
    assert torch.isfinite(empty).all() and (_col(empty, names, "nuc_count") == 0).all()


def test_otsu_separates_two_levels():
    u = torch.full((2, 8, 8), 0.2)
    u[0, :4], u[1, :2] = 0.9, 0.6
    thr = otsu_threshold(u)
    assert 0.2 < thr[0] < 0.9 and 0.2 < thr[1] < 0.6


def test_morphology_recovers_synthetic_perturbation_effects():
    """On the synthetic benchmark: gene_01 enlarges nuclei (x1.35 radius), gene_02 elongates them (x1.8)."""
    from phenoflow.data.synthetic import (
        SyntheticSpec,
        describe_effects,
        generate_synthetic,
    )

    spec = SyntheticSpec(image_size=48, channels=6, num_perturbations=4, num_experiments=2, num_cell_types=1,
                         seed=0)
    effects = describe_effects(spec)["perturbations"]
    assert effects["gene_01"]["kind"] == "nucleus_size" and effects["gene_02"]["kind"] == "elongation"
    images, meta = generate_synthetic(spec, 150, "train")
    feats, names = morphology_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    pert = np.array([m["perturbation"] for m in meta])

    def mean(p, name):
        return _col(feats, names, name)[torch.from_numpy(pert == p)].mean().item()

    assert mean("gene_01", "nuc_area_frac") > 1.3 * mean("control", "nuc_area_frac")
    assert mean("gene_01", "nuc_mean_size") > 1.3 * mean("control", "nuc_mean_size")
    assert mean("gene_02", "nuc_eccentricity") > mean("control", "nuc_eccentricity") + 0.1
