"""Expression shards: AnnData -> shard format v1 (one cell per sample, .csr payload) and ShardLoader over them.

Uses the real PerturBench fixture (tests/data/perturbench_devel.h5ad, 5,961 cells x 500 genes) with a combine
split; a generated 20k x 2k file for the memory bound.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")
sp = pytest.importorskip("scipy.sparse")

from phenoflow.data.anndata_io import ExpressionColumns
from phenoflow.data.errors import ChecksumError, DataError, ShardError
from phenoflow.data.expression_shards import convert_anndata, decode_csr, encode_csr
from phenoflow.data.expression_splits import split_cells, write_split_csv
from phenoflow.data.integrity import verify_shards
from phenoflow.data.loader import ShardLoader
from phenoflow.data.shards import index_array, load_manifest

FIXTURE = Path(__file__).parent / "data" / "perturbench_devel.h5ad"


@pytest.fixture(scope="module")
def adata():
    a = ad.read_h5ad(FIXTURE)
    a.obs_names = a.obs_names.astype(str)
    return a


@pytest.fixture(scope="module")
def folder(tmp_path_factory, adata):
    d = tmp_path_factory.mktemp("expr")
    csv = write_split_csv(split_cells(adata.obs), d / "split.csv")
    genes = list(adata.var_names[::2])  # a kept gene list: every other gene, in the data's order
    convert_anndata(FIXTURE, d / "shards", genes=genes, splits=csv, samples_per_shard=700)
    return d / "shards"


def _all(loader):
    return list(loader)


def test_csr_payload_round_trip_and_layout():
    idx, val = np.array([1, 5, 9], np.int32), np.array([0.5, 1.25, 3.0], np.float32)
    data = encode_csr(idx, val)
    assert len(data) == 4 + 8 * 3 and data[:4] == (3).to_bytes(4, "little")
    i2, v2 = decode_csr(data, 10)
    assert i2.tolist() == [1, 5, 9] and v2.tolist() == [0.5, 1.25, 3.0]
    for bad, msg in [(data[:-1], "header says"), (encode_csr(idx, val)[:2], "fewer than"),
                     (encode_csr(np.array([5, 1]), val[:2]), "increasing"), (data, "increasing")]:
        with pytest.raises(ValueError, match=msg):
            decode_csr(bad, 10 if msg != "increasing" or len(bad) != len(data) else 9)


def test_manifest_tables_and_index(folder, adata):
    m = load_manifest(folder)
    assert m["modality"] == "expression" and m["encoding"] == "csr" and m["version"] == 1
    assert m["genes"] == list(adata.var_names[::2]) and m["n_genes"] == 250
    assert m["label_groups"] == ["perturbation", "cell_type", "dataset"]
    assert m["vocabs"]["perturbation"][0] == "control" and "+" not in "".join(m["vocabs"]["perturbation"])
    assert m["vocabs"]["dataset"] == ["mcfaline23", "norman19"]
    assert m["columns"]["perturbation"] == "condition" and m["source"]["x_state"]["state"] == "log1p"
    assert sum(s["count"] for s in m["splits"].values()) == adata.n_obs
    assert set(m["splits"]) == {"train", "val", "test"}
    rec = m["splits"]["train"]["shards"][0]
    assert rec["checksum"] == "crc32" and len(rec["sha256"]) == 64
    table = json.loads((folder / rec["labels"]).read_text())
    assert set(table) == {"format", "count", "key", "perturbation", "cell_type", "dataset", "dose", "is_control",
                          "crc32"}
    arr, keys = index_array(folder / rec["index"], ("csr",))
    assert keys == table["key"] and (arr[:, 4] == 0).all()
    # a train shard mixes cells from all over the file (block shuffle), not one condition
    assert len(set(table["perturbation"])) > 10
    assert verify_shards(folder) == {s: v["count"] for s, v in m["splits"].items()}


def test_batches_reproduce_rows_and_labels(folder, adata):
    m = load_manifest(folder)
    genes = [adata.var_names.get_loc(g) for g in m["genes"]]
    X = adata.X[:, genes].toarray().astype(np.float32)
    obs = adata.obs
    split = json.loads(json.dumps(m["source"]))["split_csv"]
    want_split = dict(np.loadtxt(split, dtype=str, delimiter=","))
    pv, cv = m["vocabs"]["perturbation"], m["vocabs"]["cell_type"]
    for s in ("train", "val", "test"):
        seen = 0
        for b in ShardLoader(folder, s, 128, shuffle=True, drop_last=False, infinite=False):
            rows = [int(k[1:]) for k in b["key"]]
            assert b["x"].dtype.is_floating_point and b["x"].shape == (len(rows), 250)
            np.testing.assert_array_equal(b["x"].numpy(), X[rows])
            for r, p, c, d, dose, ctrl in zip(rows, b["perturbation"].tolist(), b["cell_type"].tolist(),
                                               b["dataset"].tolist(), b["dose"].tolist(), b["is_control"].tolist()):
                cond = str(obs["condition"].iloc[r])
                comps = [] if cond == "control" else cond.split("+")
                assert [pv[i] for i in p if i >= 0] == (comps or ["control"]) and len(p) == 2
                assert cv[c] == str(obs["cell_type"].iloc[r]) and ctrl == (cond == "control")
                assert m["vocabs"]["dataset"][d] == str(obs["dataset"].iloc[r])
                assert dose == float(str(obs["dose"].iloc[r]).split("+")[0])
                assert want_split[obs.index[r]] == s
            seen += len(rows)
        assert seen == m["splits"][s]["count"]


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_over_ranks_and_workers(folder, workers):
    keys = []
    for r in range(2):
        for b in ShardLoader(folder, "train", 100, rank=r, world_size=2, num_workers=workers, seed=3,
                             shuffle=True, drop_last=False, infinite=False):
            keys += b["key"]
    n = load_manifest(folder)["splits"]["train"]["count"]
    assert len(keys) == n == len(set(keys))


def test_resume_mid_epoch_equals_uninterrupted(folder):
    def loader():
        return ShardLoader(folder, "train", 64, seed=7, shuffle=True, drop_last=True, infinite=True)

    full, it = [], iter(loader())
    for _ in range(100):  # crosses the epoch boundary (83 batches per epoch)
        full.append(next(it))
    first = loader()
    it = iter(first)
    for _ in range(37):
        next(it)
    state = first.state_dict()
    assert set(state) == {"version", "epoch", "batch", "samples_in_epoch", "skipped", "seed", "rank",
                          "world_size", "batch_size", "num_samples", "shuffle", "split"}
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in full[37:]:
        got = next(it)
        assert got["key"] == want["key"] and np.array_equal(got["x"].numpy(), want["x"].numpy())
        assert np.array_equal(got["perturbation"].numpy(), want["perturbation"].numpy())
    bad = dict(state, batch_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        loader().load_state_dict(bad)


def _damaged_copy(folder: Path, tmp_path: Path) -> tuple[Path, dict, int, str]:
    d = tmp_path / "copy"
    shutil.copytree(folder, d)
    rec = load_manifest(d)["splits"]["val"]["shards"][0]
    arr, keys = index_array(d / rec["index"], ("csr",))
    j = int(np.argmax(arr[:, 3]))  # the largest payload
    return d, rec, j, keys[j]


def test_flipped_byte_is_caught_by_checksum(folder, tmp_path):
    d, rec, j, key = _damaged_copy(folder, tmp_path)
    arr, _ = index_array(d / rec["index"], ("csr",))
    tar = d / rec["name"]
    data = bytearray(tar.read_bytes())
    data[int(arr[j, 2] + arr[j, 3]) - 2] ^= 0x40  # a byte of the last float value: still decodes
    tar.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"key {key}: the expression bytes read have crc32"):
        _all(ShardLoader(d, "val", 64, shuffle=False, drop_last=False, infinite=False))
    skip = ShardLoader(d, "val", 64, shuffle=False, drop_last=False, infinite=False, bad_sample_policy="skip")
    assert sum(len(b["key"]) for b in _all(skip)) == rec["count"] - 1 and skip.skipped == 1
    assert len(_all(ShardLoader(d, "val", 64, shuffle=False, drop_last=False, infinite=False,
                                checksums="off"))) > 0  # unchecked: read as stored
    with pytest.raises(ChecksumError, match=f"key {key}: the expression member's crc32"):
        verify_shards(d)


def test_truncated_payload_goes_through_skip_policy(folder, tmp_path):
    d, rec, _, _ = _damaged_copy(folder, tmp_path)
    arr, _ = index_array(d / rec["index"], ("csr",))
    order = np.argsort(arr[:, 2])
    last = int(order[-1])  # truncate the tar inside the last sample's payload
    tar = d / rec["name"]
    tar.write_bytes(tar.read_bytes()[:int(arr[last, 2] + arr[last, 3] // 2)])
    with pytest.raises(ShardError, match="ends early"):
        _all(ShardLoader(d, "val", 64, shuffle=False, drop_last=False, infinite=False))
    skip = ShardLoader(d, "val", 64, shuffle=False, drop_last=False, infinite=False, bad_sample_policy="skip")
    assert sum(len(b["key"]) for b in _all(skip)) == rec["count"] - 1 and skip.skipped == 1
    assert "ends early" in skip.skipped_log[0]
    with pytest.raises(ShardError):
        verify_shards(d, checksums=False)


def test_dense_x_path_and_object_give_identical_shards(adata, tmp_path):
    small = adata[:300].to_memory()
    small.X = small.X.toarray()  # dense .X
    path = tmp_path / "dense.h5ad"
    small.write_h5ad(path)
    m1 = convert_anndata(path, tmp_path / "a", samples_per_shard=128)
    m2 = convert_anndata(small, tmp_path / "b", samples_per_shard=128)
    for r1, r2 in zip(m1["splits"]["train"]["shards"], m2["splits"]["train"]["shards"]):
        assert r1["sha256"] == r2["sha256"]
    b = next(iter(ShardLoader(tmp_path / "a", "train", 300, shuffle=False, drop_last=False, infinite=False)))
    rows = [int(k[1:]) for k in b["key"]]
    np.testing.assert_array_equal(b["x"].numpy(), small.X[rows].astype(np.float32))


def test_counts_are_normalised_and_logged(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    counts = sp.random(60, 30, density=0.3, random_state=1, format="csr", data_rvs=lambda n: rng.integers(1, 9, n))
    obs = pd.DataFrame({"condition": ["control", "A", "A+B"] * 20, "cell_type": "k"},
                       index=[f"cell.{i}/x" for i in range(60)])  # keys are row numbers: obs names may hold . and /
    a = ad.AnnData(counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))
    m = convert_anndata(a, tmp_path / "s", ExpressionColumns(dose=None, dataset=None, counts_layer=None))
    assert m["source"]["x_state"]["state"] == "counts" and m["label_groups"] == ["perturbation", "cell_type"]
    dense = counts.toarray()
    want = np.log1p(dense / dense.sum(1, keepdims=True).clip(1e-12) * 1e4).astype(np.float32)
    b = next(iter(ShardLoader(tmp_path / "s", "train", 60, shuffle=False, drop_last=False, infinite=False)))
    rows = [int(k[1:]) for k in b["key"]]
    np.testing.assert_allclose(b["x"].numpy(), want[rows], rtol=1e-6)
    assert set(map(tuple, b["perturbation"].tolist())) == {(0, -1), (1, -1), (1, 2)}


def test_bad_input_names_file_column_value(adata, tmp_path):
    with pytest.raises(DataError, match="obs column 'nope'"):
        convert_anndata(FIXTURE, tmp_path / "x", ExpressionColumns(perturbation="nope"))
    with pytest.raises(DataError, match="NOT_A_GENE"):
        convert_anndata(FIXTURE, tmp_path / "x", genes=["PERM1", "NOT_A_GENE"])
    with pytest.raises(DataError, match="max_combination=1 .*KLF1\\+MAP2K6|max_combination=1"):
        convert_anndata(FIXTURE, tmp_path / "x", max_combination=1)
    with pytest.raises(DataError, match="no such AnnData file"):
        convert_anndata(tmp_path / "missing.h5ad", tmp_path / "x")
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_backed_conversion_memory_is_bounded(tmp_path):
    """20k x 2k CSR (~32 MB of .X on disk): converting from the path never holds the matrix."""
    import pandas as pd

    n, g = 20_000, 2_000
    x = sp.random(n, g, density=0.1, random_state=0, format="csr", dtype=np.float32)
    x.data = np.log1p(x.data * 50).astype(np.float32)
    conds = np.array(["control", "A", "B", "A+B"])[np.arange(n) % 4]
    obs = pd.DataFrame({"condition": conds, "cell_type": "k"}, index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    path = tmp_path / "big.h5ad"
    a.write_h5ad(path)
    matrix_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    del a, x
    cols = ExpressionColumns(dose=None, dataset=None)
    import h5py  # noqa: F401  modules imported while tracing would count as memory of the conversion

    import phenoflow.data.convert
    import phenoflow.data.expression_prep  # noqa: F401

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        # validation and x-state passes read 256 rows at a time, the writer one 512-cell shard at a time
        m = convert_anndata(path, tmp_path / "s", cols, samples_per_shard=512, chunk_rows=256)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert m["splits"]["train"]["count"] == n
    # measured 11.7 MB above the start (labels of all cells, O(cells), + one shard and one read range); .X is 32 MB
    assert peak < matrix_bytes / 2, (peak, matrix_bytes)


def test_cli_convert_anndata(folder, tmp_path, capsys):
    from phenoflow.data.commands import register

    csv = folder.parent / "split.csv"
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(load_manifest(folder)["genes"][:20]) + "\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "convert", "anndata", "--h5ad", str(FIXTURE), "--out", str(tmp_path / "o"),
                              "--genes", str(genes), "--split-csv", str(csv),
                              "--columns", "covariates=cell_type,treatment", "--samples-per-shard", "2000"])
    assert args.func(args) == 0
    m = load_manifest(tmp_path / "o")
    assert m["n_genes"] == 20 and m["label_groups"] == ["perturbation", "cell_type", "treatment", "dataset"]
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["count"] == m["splits"]["train"]["count"]
