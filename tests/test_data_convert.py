"""Converters: fixtures written in the public layouts round-trip exactly; bad samples error or are counted."""
import csv

import numpy as np
import pytest

from phenoflow.data.convert import ConvertError, cellflux_candidates, convert
from phenoflow.data.integrity import verify_shards
from phenoflow.data.loader import ShardLoader
from phenoflow.data.shards import iter_shard, load_manifest
from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic


def _images(n, channels=6, size=16):
    spec = SyntheticSpec(image_size=size, channels=channels, num_perturbations=3, num_experiments=2)
    return generate_synthetic(spec, n, "train")[0]


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _read_all(folder):
    m = load_manifest(folder)
    out = {}
    for s in m["splits"].values():
        for rec in s["shards"]:
            for img, meta in iter_shard(folder, rec, m["image_shape"]):
                out[meta["source_key"]] = (img, meta)
    return m, out


def test_cellflux_key_rules():
    assert cellflux_candidates("U2OS-01_1_B02_s1_14")[0] == "01_1/B02/s1_14.npy"
    assert cellflux_candidates("Week1_22123_1_11_3.0")[0] == "Week1/22123/1_11_3.0.npy"


def test_cellflux_bbbc021_layout_round_trip(tmp_path):
    imgs = _images(12, channels=3)
    rows = []
    for i in range(12):
        key = f"Week{1 + i % 2}_2212{i % 3}_{i}_11_3.0"
        rel = cellflux_candidates(key)[1]
        (tmp_path / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "imgs" / rel, imgs[i])
        cpd = "DMSO" if i % 4 == 0 else ["taxol", "nocodazole"][i % 2]
        rows.append({"SAMPLE_KEY": key, "SPLIT": "train" if i < 9 else "test", "STATE": 0 if cpd == "DMSO" else 1,
                     "CPD_NAME": cpd, "DOSE": 0.3 * (i % 3), "BATCH": f"Week{1 + i % 2}", "ANNOT": "x"})
    _write_csv(tmp_path / "meta.csv", rows)
    s = convert("cellflux", tmp_path / "meta.csv", tmp_path / "out", image_root=tmp_path / "imgs",
                samples_per_shard=4, workers=2)
    assert s["splits"] == {"test": 3, "train": 9} and s["skipped"] == 0
    assert s["label_counts"]["train"]["perturbation"]["control"] == sum(
        1 for r in rows[:9] if r["CPD_NAME"] == "DMSO")
    m, got = _read_all(tmp_path / "out")
    assert m["vocabs"]["perturbation"][0] == "control" and m["image_shape"] == [16, 16, 3]
    for i, r in enumerate(rows):
        img, meta = got[r["SAMPLE_KEY"]]
        assert img.tobytes() == imgs[i].tobytes()
        assert meta["is_control"] == (r["CPD_NAME"] == "DMSO")
        assert meta["perturbation"] == ("control" if r["CPD_NAME"] == "DMSO" else r["CPD_NAME"])
        assert meta["experiment"] == r["BATCH"] and meta["dose"] == pytest.approx(r["DOSE"])
        assert "." not in meta["key"]
    assert verify_shards(tmp_path / "out") == {"test": 3, "train": 9}


def test_cellflux_rxrx1_layout(tmp_path):
    imgs = _images(6)
    rows = []
    for i in range(6):
        key = f"U2OS-0{1 + i % 2}_1_B0{i}_s1_{i}"
        rel = cellflux_candidates(key)[0]
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / rel, imgs[i])
        rows.append({"SAMPLE_KEY": key, "SPLIT": "train", "STATE": "control" if i < 2 else "trt",
                     "CPD_NAME": "EMPTY" if i < 2 else f"sirna_{i}", "PLATE": f"0{1 + i % 2}_1"})
    _write_csv(tmp_path / "meta.csv", rows)
    convert("cellflux", tmp_path / "meta.csv", tmp_path / "out")
    _, got = _read_all(tmp_path / "out")
    assert {m["cell_type"] for _, m in got.values()} == {"U2OS"}
    assert sum(m["is_control"] for _, m in got.values()) == 2
    assert all(got[r["SAMPLE_KEY"]][0].tobytes() == imgs[i].tobytes() for i, r in enumerate(rows))


def test_mit_layout_keeps_splits_and_doses(tmp_path):
    imgs = _images(9)
    rows = []
    for i in range(9):
        np.save(tmp_path / f"c{i}.npy", imgs[i].transpose(2, 0, 1))  # CHW on disk is transposed to HWC
        pert = "DMSO" if i % 3 == 0 else f"cpd{i % 3}"
        rows.append({"path": f"c{i}.npy", "experiment_id": f"e{i % 2}", "perturbation_id": pert,
                     "perturbation_id_with_dose": f"{pert}_{i}.5", "split": ["train", "iid", "ood"][i % 3]})
    _write_csv(tmp_path / "mit.csv", rows)
    s = convert("mit", tmp_path / "mit.csv", tmp_path / "out", shuffle=False)
    assert s["splits"] == {"iid": 3, "ood": 3, "train": 3}
    _, got = _read_all(tmp_path / "out")
    for i in range(9):
        img, meta = got[f"c{i}"]
        assert img.tobytes() == imgs[i].tobytes() and meta["dose"] == i + 0.5
        assert meta["split"] == rows[i]["split"] and meta["is_control"] == (i % 3 == 0)
    loader = ShardLoader(tmp_path / "out", "ood", 2, shuffle=False, drop_last=False, infinite=False)
    assert sum(len(b["key"]) for b in loader) == 3


@pytest.mark.parametrize("ext", ["npy", "png", "tif"])
def test_generic_layout_image_types(tmp_path, ext):
    imgs = _images(4, channels=3)
    rows = []
    for i in range(4):
        p = tmp_path / f"im{i}.{ext}"
        if ext == "npy":
            np.save(p, imgs[i])
        elif ext == "png":
            from PIL import Image

            Image.fromarray(imgs[i]).save(p)
        else:
            tifffile = pytest.importorskip("tifffile")
            tifffile.imwrite(p, imgs[i])
        rows.append({"path": p.name, "perturbation": "control" if i == 0 else "g1", "experiment": "x",
                     "split": "train"})
    _write_csv(tmp_path / "g.csv", rows)
    convert("generic", tmp_path / "g.csv", tmp_path / "out", encoding="png")
    _, got = _read_all(tmp_path / "out")
    assert all(got[f"im{i}"][0].tobytes() == imgs[i].tobytes() for i in range(4))


def _bbbc021_fixture(tmp_path, n=12):
    """A CellFlux BBBC021 CSV: DMSO controls and two compounds at three doses each."""
    imgs = _images(n, channels=3)
    rows = []
    for i in range(n):
        key = f"Week1_22123_{i}_11_3.0"
        rel = cellflux_candidates(key)[1]
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / rel, imgs[i])
        cpd = "DMSO" if i % 4 == 0 else ["taxol", "nocodazole"][i % 2]
        rows.append({"SAMPLE_KEY": key, "SPLIT": "train", "STATE": 0 if cpd == "DMSO" else 1, "CPD_NAME": cpd,
                     "DOSE": [0.1, 0.3, 3.0][i % 3], "BATCH": "Week1"})
    return rows


def test_label_with_dose_makes_each_dose_its_own_class(tmp_path):
    rows = _bbbc021_fixture(tmp_path)
    _write_csv(tmp_path / "meta.csv", rows)
    convert("cellflux", tmp_path / "meta.csv", tmp_path / "plain")
    convert("cellflux", tmp_path / "meta.csv", tmp_path / "dosed", label_with_dose=True)
    m0, plain = _read_all(tmp_path / "plain")
    m1, dosed = _read_all(tmp_path / "dosed")
    assert m0["vocabs"]["perturbation"] == ["control", "nocodazole", "taxol"]
    expected = {"control"} | {f"{r['CPD_NAME']}_{r['DOSE']:g}" for r in rows if r["CPD_NAME"] != "DMSO"}
    assert set(m1["vocabs"]["perturbation"]) == expected and m1["vocabs"]["perturbation"][0] == "control"
    assert len(m1["vocabs"]["perturbation"]) == 7 > len(m0["vocabs"]["perturbation"])  # 2 compounds x 3 doses
    for r in rows:
        a, b = plain[r["SAMPLE_KEY"]][1], dosed[r["SAMPLE_KEY"]][1]
        ctrl = r["CPD_NAME"] == "DMSO"
        assert a["perturbation"] == ("control" if ctrl else r["CPD_NAME"])
        assert b["perturbation"] == ("control" if ctrl else f"{r['CPD_NAME']}_{r['DOSE']:g}")
        assert a["compound"] == b["compound"] == r["CPD_NAME"] and a["dose"] == b["dose"] == r["DOSE"]
    assert dosed[rows[1]["SAMPLE_KEY"]][1]["perturbation"] == "nocodazole_0.3"
    # MiT layout: the flag uses perturbation_id_with_dose as written.
    mit = [{"path": cellflux_candidates(r["SAMPLE_KEY"])[1], "experiment_id": "e1",
            "perturbation_id": r["CPD_NAME"], "perturbation_id_with_dose": f"{r['CPD_NAME']}_{r['DOSE']}",
            "split": "train"} for r in rows]
    _write_csv(tmp_path / "mit.csv", mit)
    s0 = convert("mit", tmp_path / "mit.csv", tmp_path / "mit0")
    s1 = convert("mit", tmp_path / "mit.csv", tmp_path / "mit1", label_with_dose=True)
    assert set(s0["label_counts"]["train"]["perturbation"]) == {"control", "nocodazole", "taxol"}
    assert set(s1["label_counts"]["train"]["perturbation"]) == {"control"} | {
        x["perturbation_id_with_dose"] for x in mit if x["perturbation_id"] != "DMSO"}
    assert "taxol_3.0" in s1["label_counts"]["train"]["perturbation"]


def test_empty_dose_of_a_treated_row_is_an_error(tmp_path):
    rows = _bbbc021_fixture(tmp_path, n=4)
    rows[0]["DOSE"] = ""  # a DMSO control: no dose needed
    _write_csv(tmp_path / "ok.csv", rows)
    s = convert("cellflux", tmp_path / "ok.csv", tmp_path / "ok")
    assert s["splits"] == {"train": 4}
    rows[2]["DOSE"] = ""  # a treated row (taxol): a missing dose must not become 0.0
    _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ConvertError, match=r"bad\.csv, row 4, column DOSE, value '': the dose of a non-control row is empty"):
        convert("cellflux", tmp_path / "bad.csv", tmp_path / "out")
    rows[2]["DOSE"] = "high"
    _write_csv(tmp_path / "bad2.csv", rows)
    with pytest.raises(ConvertError, match=r"bad2\.csv, row 4, column DOSE, value 'high': dose 'high' is not a number"):
        convert("cellflux", tmp_path / "bad2.csv", tmp_path / "out")
    # MiT: a perturbation_id_with_dose without a parsable dose is an error; siRNA CSVs without one keep 0.0.
    mit = [{"path": "x.npy", "experiment_id": "e", "perturbation_id": "taxol", "perturbation_id_with_dose": "taxol_",
            "split": "train"}]
    _write_csv(tmp_path / "mit.csv", mit)
    with pytest.raises(ConvertError, match="mit\\.csv, row 2, column perturbation_id_with_dose, value 'taxol_'"):
        convert("mit", tmp_path / "mit.csv", tmp_path / "out")
    np.save(tmp_path / "x.npy", _images(1)[0])
    _write_csv(tmp_path / "sirna.csv", [{"path": "x.npy", "experiment_id": "e", "perturbation_id": "sirna_1",
                                         "split": "train"}])
    convert("mit", tmp_path / "sirna.csv", tmp_path / "sirna", label_with_dose=True)
    _, got = _read_all(tmp_path / "sirna")
    assert got["x"][1]["dose"] == 0.0 and got["x"][1]["perturbation"] == "sirna_1"


def _bad_fixture(tmp_path):
    imgs = _images(5)
    np.save(tmp_path / "ok0.npy", imgs[0])
    np.save(tmp_path / "ok1.npy", imgs[1])
    f = imgs[2].astype(np.float32)
    f[3, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", f)
    np.save(tmp_path / "big.npy", imgs[3].astype(np.int32) + 300)
    np.save(tmp_path / "small.npy", imgs[4][:8])
    names = ["ok0", "ok1", "nan", "big", "small", "missing"]
    _write_csv(tmp_path / "g.csv", [{"path": f"{n}.npy", "perturbation": "p"} for n in names])
    return tmp_path / "g.csv"


def test_bad_samples_error_by_default_naming_row_and_file(tmp_path):
    csv_path = _bad_fixture(tmp_path)
    with pytest.raises(ConvertError, match=r"g\.csv, row 4, column path, value 'nan\.npy': NaN: .*nan\.npy: 1 NaN/inf values \(key nan\)"):
        convert("generic", csv_path, tmp_path / "out", shuffle=False)


def test_bad_samples_skip_policy_counts_every_case(tmp_path):
    csv_path = _bad_fixture(tmp_path)
    s = convert("generic", csv_path, tmp_path / "out", bad_sample_policy="skip")
    assert s["splits"] == {"train": 2} and s["skipped"] == 4
    assert s["skipped_by_reason"] == {"NaN": 1, "out of range": 1, "wrong shape": 1, "missing file": 1}
    assert load_manifest(tmp_path / "out")["source"]["skipped"] == 4


def test_bad_csv_errors(tmp_path):
    _write_csv(tmp_path / "a.csv", [{"path": "x.npy"}])
    with pytest.raises(ConvertError, match="row 2, column perturbation, value None: missing"):
        convert("generic", tmp_path / "a.csv", tmp_path / "out")
    _write_csv(tmp_path / "b.csv", [{"path": "x.npy", "perturbation": "a", "dose": "lots"}])
    with pytest.raises(ConvertError, match="dose 'lots'"):
        convert("generic", tmp_path / "b.csv", tmp_path / "out")
    np.save(tmp_path / "x.npy", _images(1)[0])
    _write_csv(tmp_path / "c.csv", [{"path": "x.npy", "perturbation": "a", "key": "k.1"},
                                    {"path": "x.npy", "perturbation": "a", "key": "k/1"}])
    with pytest.raises(ConvertError, match="same sample key 'k_1'"):
        convert("generic", tmp_path / "c.csv", tmp_path / "out")
    # Labels outside given vocabularies (e.g. a pretraining run's) are an error naming the label.
    _write_csv(tmp_path / "d.csv", [{"path": "x.npy", "perturbation": "control"}])
    convert("generic", tmp_path / "d.csv", tmp_path / "v")
    _write_csv(tmp_path / "e.csv", [{"path": "x.npy", "perturbation": "new_gene"}])
    with pytest.raises(ConvertError, match="'new_gene'.*perturbation"):
        convert("generic", tmp_path / "e.csv", tmp_path / "out", vocab_from=tmp_path / "v")


def test_cli_convert_prints_counts(tmp_path, capsys):
    import argparse
    import json

    from phenoflow.data import commands

    imgs = _images(3)
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", imgs[i])
    _write_csv(tmp_path / "g.csv", [{"path": f"{i}.npy", "perturbation": "control" if i == 0 else "g",
                                     "split": "train" if i < 2 else "ood"} for i in range(3)])
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "convert", "generic", "--csv", str(tmp_path / "g.csv"), "--out",
                              str(tmp_path / "out"), "--workers", "2", "--samples-per-shard", "1", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"ood": 1, "train": 2} and summary["shards"] == {"ood": 1, "train": 2}
    assert summary["label_counts"]["train"]["perturbation"] == {"control": 1, "g": 1}
    # --label-with-dose reaches the converter.
    _write_csv(tmp_path / "d.csv", [{"path": f"{i}.npy", "perturbation": "control" if i == 0 else "g",
                                     "dose": "" if i == 0 else i} for i in range(3)])
    args = parser.parse_args(["data", "convert", "generic", "--csv", str(tmp_path / "d.csv"), "--out",
                              str(tmp_path / "out2"), "--label-with-dose", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["label_counts"]["train"]["perturbation"] == {"control": 1, "g_1": 1, "g_2": 1}
