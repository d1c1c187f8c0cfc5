"""`phenoflow data convert` as a user runs it on the public IMPA/CellFlux layout (metadata/ beside imgs/): the image
root is found (or the error says to pass --images), ANNOT / PLATE / BATCH reach the per-sample metadata, progress
lines, the short summary and label_counts.csv, and a non-empty --out (refused; --overwrite replaces a previous
conversion leaving no orphan file, and a failed overwrite leaves the previous conversion as it was).
CLI subprocess tests (issue 13, items 5 and 12)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

MOAS = {"taxol": "Microtubule stabilizers", "AZ138": "Eg5 inhibitors", "DMSO": "DMSO"}


def _public_bbbc021(base: Path, n: int = 12, missing: tuple[int, ...] = ()) -> Path:
    """bbbc021/metadata/bbbc021_df_all.csv and bbbc021/imgs/Week1/<plate>/<well>_<site>.0.npy (96x96x3 crops)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cpd = ["DMSO", "taxol", "AZ138"][i % 3]
        plate = f"2212{i % 2}"
        key = f"Week1_{plate}_{i}_11_3.0"
        if i not in missing:
            p = base / "bbbc021" / "imgs" / "Week1" / plate / f"{i}_11_3.0.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
        rows.append({"SAMPLE_KEY": key, "SPLIT": "train" if i < n * 3 // 4 else "test", "STATE": 0 if cpd == "DMSO" else 1,
                     "ANNOT": MOAS[cpd], "CPD_NAME": cpd, "DOSE": "" if cpd == "DMSO" else "0.3",
                     "BATCH": f"Week1_{plate}", "PLATE": plate})
    meta = base / "bbbc021" / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    with open(meta / "bbbc021_df_all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return meta / "bbbc021_df_all.csv"


def _phenoflow(*args: str, progress_s: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "PHENOFLOW_PROGRESS_S": progress_s, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "phenoflow", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def _main(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (cheaper than a subprocess: the data package imports torch): code, stdout, stderr."""
    from phenoflow.cli import main

    monkeypatch.setenv("PHENOFLOW_PROGRESS_S", "0")
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _first_json_member(tar: Path) -> dict:
    with tarfile.open(tar) as t:
        m = next(x for x in t.getmembers() if x.name.endswith(".json"))
        return json.loads(t.extractfile(m).read())


def test_public_layout_images_found_and_moa_plate_kept(tmp_path):
    csv_path = _public_bbbc021(tmp_path)
    out = tmp_path / "shards"
    r = _phenoflow("data", "convert", "cellflux", "--csv", str(csv_path), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(images: {tmp_path / 'bbbc021' / 'imgs'})" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 9, "test": 3}
    meta = _first_json_member(out / m["splits"]["train"]["shards"][0]["name"])
    assert meta["moa"] == MOAS[meta["compound"]]
    assert meta["plate"] in ("22120", "22121") and meta["batch"] == f"Week1_{meta['plate']}"
    assert meta["experiment"] == meta["batch"]  # BATCH stays the experiment label (PLATE when there is no BATCH)


def test_images_not_found_says_to_pass_images(tmp_path):
    csv_path = _public_bbbc021(tmp_path)
    (tmp_path / "bbbc021" / "imgs").rename(tmp_path / "elsewhere")
    r = _phenoflow("data", "convert", "cellflux", "--csv", str(csv_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "cannot find the images" in r.stderr and "--images DIR" in r.stderr
    assert str(tmp_path / "bbbc021" / "imgs") in r.stderr  # the folders tried are named
    assert "Week1/22120/0_11_3.0.npy" in r.stderr  # and what was looked for
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    r = _phenoflow("data", "convert", "cellflux", "--csv", str(csv_path), "--out", str(tmp_path / "o"),
                   "--images", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_summary_label_counts_file_and_progress(tmp_path, capsys, monkeypatch):
    csv_path = _public_bbbc021(tmp_path, n=30, missing=(4, 5))
    out = tmp_path / "shards"
    r = _phenoflow("data", "convert", "cellflux", "--csv", str(csv_path), "--out", str(out), "--samples-per-shard",
                   "4", "--bad-sample-policy", "skip")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) <= 10, r.stdout  # a short summary, not one line per label
    assert "converted 28 images (96x96x3, raw)" in lines[0]
    assert "splits: test 8 (2 shards), train 20 (6 shards)" in r.stdout
    assert "perturbation: 3 labels; top: control 10, AZ138 9, taxol 9" in r.stdout
    assert f"skipped 2 bad rows (missing file 2), listed in {out / 'skipped_rows.csv'}" in r.stdout
    with open(out / "skipped_rows.csv") as f:
        assert [(x["row"], x["value"]) for x in csv.DictReader(f)] == [
            ("6", "Week1_22120_4_11_3.0"), ("7", "Week1_22121_5_11_3.0")]
    assert str(out / "label_counts.csv") in r.stdout
    with open(out / "label_counts.csv") as f:
        table = list(csv.DictReader(f))
    got = {(x["split"], x["group"], x["label"]): int(x["count"]) for x in table}
    m = json.loads((out / "manifest.json").read_text())
    want = {(s, g, lab): n for s, v in m["label_counts"].items() for g, c in v.items() for lab, n in c.items()}
    assert got == want and got[("train", "perturbation", "control")] == 8
    # progress: plain lines on a pipe (PHENOFLOW_PROGRESS_S=0: every shard), ending with the total
    prog = [x for x in r.stderr.splitlines() if x.startswith("[convert]")]
    assert len(prog) >= 3 and prog[0].startswith("[convert] 0/30 images") and "done in" in prog[-1], r.stderr
    code, stdout, err = _main(capsys, monkeypatch, "data", "verify", str(out))
    assert code == 0 and "OK" in stdout, err
    prog = [x for x in err.splitlines() if x.startswith("[verify]")]
    assert prog[0].startswith("[verify] 0/8 shards") and prog[-1].startswith("[verify] 8/8 shards"), err


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_non_empty_out_refused_overwrite_leaves_no_orphans(tmp_path, capsys, monkeypatch):
    csv_path = _public_bbbc021(tmp_path, n=12)
    out = tmp_path / "shards"
    base = ["data", "convert", "cellflux", "--csv", str(csv_path), "--out", str(out)]
    assert _main(capsys, monkeypatch, *base, "--samples-per-shard", "1")[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(before) == 12 * 3 + 2  # 12 shards (tar, idx, labels), manifest, label_counts.csv
    r = _phenoflow(*base, "--samples-per-shard", "5")
    assert r.returncode == 2 and "is not empty" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    # A failed overwrite (an image vanished: bad sample, policy error) leaves the previous conversion as it was.
    victim = tmp_path / "bbbc021" / "imgs" / "Week1" / "22121" / "7_11_3.0.npy"
    victim.rename(tmp_path / "away.npy")
    code, _, err = _main(capsys, monkeypatch, *base, "--samples-per-shard", "5", "--overwrite")
    assert code == 2 and "missing file" in err, err[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (tmp_path / "away.npy").rename(victim)
    # --overwrite: the new conversion and nothing else (the 12 one-sample shards are gone).
    code, _, err = _main(capsys, monkeypatch, *base, "--samples-per-shard", "5", "--overwrite")
    assert code == 0, err[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    listed = {rec[k] for s in m["splits"].values() for rec in s["shards"] for k in ("name", "index", "labels")}
    assert len(listed) == 3 * 3  # train: 2 shards of 5 (9 images), test: 1
    assert _files(out) == listed | {"manifest.json", "label_counts.csv"}
    assert _main(capsys, monkeypatch, "data", "verify", str(out))[0] == 0
    # Files that no conversion writes are refused even with --overwrite, and nothing is deleted.
    (out / "notes.txt").write_text("mine")
    code, _, err = _main(capsys, monkeypatch, *base, "--overwrite")
    assert code == 2 and "notes.txt" in err and "Nothing was deleted" in err, err[-2000:]
    assert _files(out) == listed | {"manifest.json", "label_counts.csv", "notes.txt"}


def test_crash_while_replacing_leaves_no_manifest(tmp_path, capsys, monkeypatch):
    """A crash after the old manifest is removed (simulated: the new manifest cannot be moved in) leaves a
    folder without a manifest, which readers refuse, never the old manifest over new shards."""
    csv_path = _public_bbbc021(tmp_path, n=6)
    out = tmp_path / "shards"
    base = ["data", "convert", "cellflux", "--csv", str(csv_path), "--out", str(out)]
    assert _main(capsys, monkeypatch, *base, "--samples-per-shard", "1")[0] == 0
    code = ("import os, sys\n"
            "real = os.replace\n"
            "def fake(a, b):\n"
            "    if str(b).endswith('/manifest.json') and '.convert-' in str(a) and '.convert-' not in str(b):\n"
            "        os._exit(9)\n"
            "    return real(a, b)\n"
            "os.replace = fake\n"
            "from phenoflow.cli import main\n"
            f"sys.exit(main({[*base, '--overwrite', '--samples-per-shard', '2']!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 9, r.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    # The old one-sample shards are gone (no train-000002.tar); the new ones are there, but no manifest lists them.
    assert sorted(f for f in _files(out) if f.endswith(".tar") and "/" not in f) == [
        "test-000000.tar", "train-000000.tar", "train-000001.tar"]
    code, _, err = _main(capsys, monkeypatch, "data", "verify", str(out))
    assert code == 2 and "manifest" in err, err[-2000:]
    # Rerunning with --overwrite cleans up the staging folder of the crashed run.
    assert _main(capsys, monkeypatch, *base, "--overwrite")[0] == 0
    assert not [f for f in _files(out) if f.startswith(".")]


def test_anndata_convert_refuses_a_non_empty_out_and_overwrite_leaves_no_orphans(tmp_path, capsys, monkeypatch):
    h5ad = Path(__file__).parent / "data" / "perturbench_devel.h5ad"
    out = tmp_path / "expr"
    base = ["data", "convert", "anndata", "--h5ad", str(h5ad), "--out", str(out), "--columns",
            "covariates=cell_type,treatment"]
    assert _main(capsys, monkeypatch, *base, "--samples-per-shard", "1000")[0] == 0
    before = sorted(p.name for p in out.iterdir())
    assert "train-000005.tar" in before
    code, _, err = _main(capsys, monkeypatch, *base)
    assert code == 2 and "is not empty" in err and "--overwrite" in err, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == before
    assert _main(capsys, monkeypatch, *base, "--overwrite")[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    listed = {rec[k] for s in m["splits"].values() for rec in s["shards"] for k in ("name", "index", "labels")}
    assert _files(out) == listed | {"manifest.json"} and "train-000005.tar" not in listed
