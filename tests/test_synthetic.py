"""Synthetic cell painting: determinism by (seed, index) and the documented effects visible in the images."""
import numpy as np
import pytest
from scipy import ndimage

from phenoflow.data.synthetic import (
    COMPOUNDS,
    KINDS,
    SyntheticSpec,
    describe_effects,
    effects_markdown,
    generate_synthetic,
    labels_of,
)


def test_same_seed_and_index_give_identical_bytes():
    spec = SyntheticSpec(image_size=32, num_perturbations=4, num_experiments=2, seed=3)
    a, ma = generate_synthetic(spec, 40, "train")
    b, mb = generate_synthetic(spec, 40, "train")
    assert a.dtype == np.uint8 and a.shape == (40, 32, 32, 6)
    assert a.tobytes() == b.tobytes() and ma == mb
    # A sub-range equals the slice of the longer run (sample i never depends on the others).
    c, mc = generate_synthetic(spec, 7, "train", start_index=29)
    assert c.tobytes() == a[29:36].tobytes() and mc == ma[29:36]
    # Seed and split change the images, not the labels.
    d, md = generate_synthetic(SyntheticSpec(image_size=32, num_perturbations=4, num_experiments=2, seed=4), 40)
    e, _ = generate_synthetic(spec, 40, "val")
    assert not np.array_equal(a, d) and not np.array_equal(a, e)
    assert [m["perturbation"] for m in md] == [m["perturbation"] for m in ma]


def test_metadata_and_control_in_every_experiment():
    spec = SyntheticSpec(image_size=16, channels=3, num_perturbations=3, num_experiments=4, num_cell_types=2)
    _, meta = generate_synthetic(spec, 64, "train")
    assert set(meta[0]) >= {"key", "perturbation", "experiment", "cell_type", "dose", "smiles", "is_control", "split"}
    assert {m["experiment"] for m in meta if m["is_control"]} == {"exp_01", "exp_02", "exp_03", "exp_04"}
    assert {m["cell_type"] for m in meta} == {"U2OS", "HUVEC"}
    assert all(m["dose"] == 0.0 and m["smiles"] is None for m in meta)
    assert all(m["is_control"] == (m["perturbation"] == "control") for m in meta)
    assert len({m["key"] for m in meta}) == 64


def test_describe_effects_table():
    spec = SyntheticSpec(image_size=32, num_perturbations=10)
    d = describe_effects(spec)
    assert d["perturbations"]["control"]["kind"] == "none"
    assert all(v == 1.0 for v in d["perturbations"]["control"]["intensity"].values())
    kinds = [d["perturbations"][f"gene_{k:02d}"]["kind"] for k in range(1, 11)]
    assert kinds == list(KINDS) * 2
    assert d["perturbations"]["gene_01"]["nucleus_size"] == 1.35 and d["perturbations"]["gene_06"]["nucleus_size"] == 0.75
    assert d["perturbations"]["gene_04"]["target_channel"] == "ER"
    assert "gene_04" in effects_markdown(spec)
    g = [np.array(list(e["gain"].values())) for e in d["experiments"].values()]
    assert not np.allclose(g[0], g[1])


def test_compound_mode_has_smiles_and_doses():
    spec = SyntheticSpec(image_size=16, channels=3, num_perturbations=4, num_experiments=1, compounds=True)
    _, meta = generate_synthetic(spec, 40)
    treated = [m for m in meta if not m["is_control"]]
    assert {m["perturbation"] for m in treated} == {c[0] for c in COMPOUNDS[:4]}
    assert {m["dose"] for m in treated} > {0.1}
    Chem = pytest.importorskip("rdkit.Chem")
    for _, smi in COMPOUNDS:
        assert Chem.MolFromSmiles(smi) is not None, smi


# ---------------------------------------------------------------------------------------------------------
# The documented effects, measured on the images (batch effects removed with the documented gain/offset).

@pytest.fixture(scope="module")
def measured():
    spec = SyntheticSpec(image_size=48, channels=6, num_perturbations=10, num_experiments=2, seed=0)
    n = 2 * 11 * 24
    images, meta = generate_synthetic(spec, n, "train")
    eff = describe_effects(spec)
    gain = np.array([list(eff["experiments"][m["experiment"]]["gain"].values()) for m in meta])
    off = np.array([list(eff["experiments"][m["experiment"]]["offset"].values()) for m in meta])
    clean = (images / 255.0 - off[:, None, None, :]) / gain[:, None, None, :]
    groups = {}
    for i, m in enumerate(meta):
        groups.setdefault(m["perturbation"], []).append(i)
    return spec, images, meta, clean, {k: np.array(v) for k, v in groups.items()}


def _ratio(stat, groups, name):
    return np.mean([stat(i) for i in groups[name]]) / np.mean([stat(i) for i in groups["control"]])


def test_nucleus_size_effect(measured):
    _, _, _, clean, groups = measured
    area = lambda i: (clean[i, :, :, 0] > 0.3).sum()
    assert _ratio(area, groups, "gene_01") > 1.4  # radius x1.35 -> area ~x1.8
    assert _ratio(area, groups, "gene_06") < 0.7  # radius x0.75 -> area ~x0.56


def _elongation(mask):
    lab, n = ndimage.label(mask)
    out = []
    for j in range(1, n + 1):
        ys, xs = np.nonzero(lab == j)
        if len(ys) < 8:
            continue
        ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
        out.append(np.sqrt(ev[1] / max(ev[0], 1e-6)))
    return np.median(out) if out else 1.0


def test_elongation_effect(measured):
    _, _, _, clean, groups = measured
    el = lambda i: _elongation(clean[i, :, :, 0] > 0.3)
    assert _ratio(el, groups, "gene_02") > 1.25  # aspect x1.8 (touching nuclei blur it a little)


def test_cytoplasm_effect(measured):
    _, _, _, clean, groups = measured
    cell = lambda i: (clean[i, :, :, 1:].max(-1) > 0.08).sum() / max((clean[i, :, :, 0] > 0.3).sum(), 1)
    assert _ratio(cell, groups, "gene_03") > 1.25  # cell area per nuclear area grows
    assert _ratio(cell, groups, "gene_08") < 0.85  # cytoplasm x0.8


def test_intensity_effect(measured):
    spec, _, _, clean, groups = measured
    d = describe_effects(spec)["perturbations"]
    mean = {name: clean[idx].mean((0, 1, 2)) for name, idx in groups.items()}
    # Geometry varies between crops, so compare the target channel with the other channels' median change.
    up = mean["gene_04"] / mean["control"]  # ER x1.6
    assert d["gene_04"]["target_channel"] == "ER"
    assert 1.35 < up[1] / np.median(np.delete(up, 1)) < 1.9
    down = mean["gene_09"] / mean["control"]  # the target channel (actin) x0.6
    c = list(d["gene_09"]["intensity"]).index(d["gene_09"]["target_channel"])
    assert 0.45 < down[c] / np.median(np.delete(down, c)) < 0.75


def test_texture_effect(measured):
    _, _, _, clean, groups = measured

    def cv(i):  # high-frequency texture of DNA inside the nuclei (edges eroded), relative to its level
        x = clean[i, :, :, 0]
        inside = ndimage.binary_erosion(x > 0.3, iterations=2)
        hp = x - ndimage.uniform_filter(x, 3)
        return hp[inside].std() / max(x[inside].mean(), 1e-3) if inside.sum() > 4 else np.nan

    def _r(name):
        return np.nanmean([cv(i) for i in groups[name]]) / np.nanmean([cv(i) for i in groups["control"]])

    assert _r("gene_05") > 1.3  # texture x2.0
    assert _r("gene_10") < 0.8  # texture x0.4


def test_batch_effects_differ_between_experiments(measured):
    spec, images, meta, _, _ = measured
    eff = describe_effects(spec)["experiments"]
    for exp, e in eff.items():
        ctrl = np.array([i for i, m in enumerate(meta) if m["experiment"] == exp and m["is_control"]])
        # Background (far from cells, all channels low) sits at the experiment's offset.
        bg = np.median(images[ctrl].reshape(-1, 6)[images[ctrl].reshape(-1, 6).max(1) < 40], axis=0)
        assert np.allclose(bg, np.array(list(e["offset"].values())) * 255 + 0.5, atol=1.5)
    m1 = images[[i for i, m in enumerate(meta) if m["experiment"] == "exp_01" and m["is_control"]]].mean((0, 1, 2))
    m2 = images[[i for i, m in enumerate(meta) if m["experiment"] == "exp_02" and m["is_control"]]].mean((0, 1, 2))
    assert np.abs(m1 - m2).max() > 1.0


def test_labels_cycle():
    spec = SyntheticSpec(image_size=16, num_perturbations=2, num_experiments=3)
    assert [labels_of(spec, i)[:2] for i in range(9)] == [(k, e) for k in range(3) for e in range(3)]
