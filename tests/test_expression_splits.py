"""PerturBench split tasks on the real fixture (tests/data/perturbench_devel.h5ad) and split CSV round trips."""
from pathlib import Path

import pandas as pd
import pytest

ad = pytest.importorskip("anndata")

from phenoflow.data.errors import DataError
from phenoflow.data.expression_splits import (
    SplitSpec,
    default_split_path,
    read_split_csv,
    split_cells,
    summary,
    write_split_csv,
)

FIXTURE = Path(__file__).parent / "data" / "perturbench_devel.h5ad"


@pytest.fixture(scope="module")
def obs():
    return ad.read_h5ad(FIXTURE).obs


def pairs(obs, split, which):
    sel = split.to_numpy() == which
    return set(zip(obs["condition"].astype(str)[sel], obs["cell_type"].astype(str)[sel]))


def test_combine_holds_out_combinations_singles_train(obs):
    r = split_cells(obs, spec=SplitSpec(task="combine"))
    held = r.heldout
    # k562 has 15 combinations: int(0.3 * 15) = 4 held out, 2 val and 2 test; other lines have none
    assert len(held) == 4 and all("+" in p and cov == ("k562",) for p, cov in held)
    assert sorted(held.values()) == ["test", "test", "val", "val"]
    singles = obs["condition"].astype(str).map(lambda c: "+" not in c and c != "control").to_numpy()
    assert (r.split.to_numpy()[singles] == "train").all()
    for (p, cov), s in held.items():
        cells = (obs["condition"] == p).to_numpy() & (obs["cell_type"] == cov[0]).to_numpy()
        assert (r.split.to_numpy()[cells] == s).all()
    # 11 combinations stay in training; controls: half train, a quarter each in val and test, per cell line
    assert sum(1 for p, _ in pairs(obs, r.split, "train") if "+" in p) == 11
    ctrl = obs["condition"] == "control"
    for ct, n in obs[ctrl]["cell_type"].value_counts().items():
        sub = r.split[(ctrl & (obs["cell_type"] == ct)).to_numpy()]
        assert sub.value_counts().to_dict() == {"train": n // 2, "val": n // 4, "test": n - n // 2 - n // 4}
    assert r.counts() == {"train": 5361, "val": 300, "test": 300}
    assert summary(r, obs).loc["k562", "train"] == 30


def test_splits_are_deterministic_per_seed(obs):
    for task in ("combine", "combine_inverse", "transfer"):
        a = split_cells(obs, spec=SplitSpec(task=task, seed=42))
        b = split_cells(obs.copy(), spec=SplitSpec(task=task, seed=42))
        assert a.split.equals(b.split) and a.heldout == b.heldout
    seeds = {tuple(sorted(split_cells(obs, spec=SplitSpec(seed=s)).heldout)) for s in range(6)}
    assert len(seeds) > 1


def test_combine_inverse_holds_out_singles_combinations_train(obs):
    r = split_cells(obs, spec=SplitSpec(task="combine_inverse"))
    assert all("+" not in p and p != "control" for p, _ in r.heldout)
    k562 = [p for p, cov in r.heldout if cov == ("k562",)]
    assert len(k562) == 5  # int(0.3 * 18 singles)
    combos = [c for c in obs["condition"].unique() if "+" in c]
    sel = obs["condition"].isin(combos).to_numpy()
    assert (r.split.to_numpy()[sel] == "train").all()
    # no combination has both components held out: each held-out single has a partner seen alone
    for c in combos:
        assert sum(part in k562 for part in c.split("+")) <= 1


def test_transfer_holds_out_perturbations_in_some_cell_types(obs):
    spec = SplitSpec(task="transfer")
    r = split_cells(obs, spec=spec)
    assert r.heldout
    train = pairs(obs, r.split, "train")
    for p, cov in r.heldout:
        assert p != "control"
        assert any(tp == p and tc != cov[0] for tp, tc in train), f"{p} must stay in training elsewhere"
    per_cov = pd.Series([cov[0] for _, cov in r.heldout]).value_counts()
    n_labels = obs.groupby("cell_type", observed=True)["condition"].nunique()
    for cov, n in per_cov.items():
        assert n < 0.3 * n_labels[cov] + 1  # cap: fewer than 30% of a cell line's labels
    # perturbations measured in only one cell line (k562-only) are never held out
    only_k562 = set(obs.loc[obs.cell_type == "k562", "condition"]) - set(obs.loc[obs.cell_type != "k562", "condition"])
    assert not any(p in only_k562 for p, _ in r.heldout)


def test_split_csv_round_trip(obs, tmp_path):
    r = split_cells(obs, spec=SplitSpec(task="combine", seed=7))
    path = default_split_path(tmp_path / "devel.h5ad", r.spec)
    assert path.name == "devel.split_combine_seed7.csv"
    write_split_csv(r, path)
    first = path.read_text().splitlines()[0].split(",")
    assert first[0] == obs.index[0] and first[1] in ("train", "val", "test")  # PerturBench layout, no header
    back = read_split_csv(path, obs.index)
    assert back.equals(r.split)
    # PerturBench's own reader gets the same series
    pb = pd.read_csv(path, index_col=0, header=None).iloc[:, 0]
    assert list(pb.index) == list(obs.index) and (pb.to_numpy() == r.split.to_numpy()).all()
    meta = __import__("json").loads(path.with_name(path.name + ".json").read_text())
    assert meta["spec"]["seed"] == 7 and meta["counts"] == r.counts() and len(meta["heldout"]) == 4
    # a header row is accepted; order follows the data
    (tmp_path / "h.csv").write_text("cell_id,split\n" + "\n".join(f"{c},train" for c in reversed(obs.index)))
    assert list(read_split_csv(tmp_path / "h.csv", obs.index).index) == list(obs.index)


def test_split_csv_bad_rows(obs, tmp_path):
    ids = list(obs.index[:3])
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{ids[0]},train\n{ids[1]},holdout\n")
    with pytest.raises(DataError, match=r"bad.csv: row 2: column split: value 'holdout'"):
        read_split_csv(bad)
    bad.write_text(f"{ids[0]},train\n{ids[0]},val\n")
    with pytest.raises(DataError, match="duplicated cell id"):
        read_split_csv(bad)
    bad.write_text(f"{ids[0]},train\nnot_a_cell,val\n")
    with pytest.raises(DataError, match="not in the data"):
        read_split_csv(bad, ids)
    bad.write_text(f"{ids[0]},train\n")
    with pytest.raises(DataError, match="2 cells of the data have no split"):
        read_split_csv(bad, ids)


def test_split_bad_inputs(obs):
    with pytest.raises(DataError, match="task"):
        SplitSpec(task="random")
    with pytest.raises(DataError, match="'cell_line' not found"):
        from phenoflow.data.anndata_io import ExpressionColumns
        split_cells(obs, ExpressionColumns(covariates=["cell_line"]))
    with pytest.raises(DataError, match="no control cells"):
        split_cells(obs[obs.condition != "control"])
