"""Presets match the converters' layouts; image size, channels and the evaluation split come from the manifest
unless set (issue 13, item 7; phenoflow/manifest_defaults.py): 0 / empty take the manifest's values when the config
is resolved, a set value that differs is refused before any work naming both values and the override."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phenoflow.config import resolve
from phenoflow.data.convert import convert
from phenoflow.errors import ConfigError
from phenoflow.train.preflight import preflight, preflight_eval


def _bbbc021_shards(tmp_path: Path, size: int = 16) -> Path:
    """The public CellFlux BBBC021 layout (splits train / test) at `size` px, converted."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        cpd = ["DMSO", "taxol", "AZ138"][i % 3]
        p = tmp_path / "bbbc021" / "imgs" / "Week1" / "22123" / f"{i}_11_3.0.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        rows.append({"SAMPLE_KEY": f"Week1_22123_{i}_11_3.0", "SPLIT": "train" if i < 9 else "test",
                     "STATE": 0 if cpd == "DMSO" else 1, "ANNOT": "x", "CPD_NAME": cpd,
                     "DOSE": "" if cpd == "DMSO" else "1.0", "BATCH": "Week1_22123"})
    meta = tmp_path / "bbbc021" / "metadata"
    meta.mkdir(parents=True)
    with open(meta / "df.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    convert("cellflux", meta / "df.csv", tmp_path / "shards", progress=False)
    return tmp_path / "shards"


def test_shape_and_split_from_the_manifest(tmp_path):
    shards = _bbbc021_shards(tmp_path)
    c = resolve("bbbc021", [f"data.shards={shards}", "data.image_size=0", "data.channels=0", "eval.split=",
                             "train.batch_size=8"])
    assert (c.data.image_size, c.data.channels, c.eval.split) == (16, 3, "test")
    preflight(c, evaluate=True)  # consistent with the data
    # The rxrx1 preset evaluates the public layout's test split (it had val, which that layout does not have).
    r = resolve("mit-xl2-rxrx1", [])
    assert (r.data.image_size, r.data.channels, r.eval.split) == (96, 6, "test")
    # The MiT CSV's splits (train / iid / ood): the empty eval.split takes iid.
    from phenoflow.manifest_defaults import held_out_split

    assert held_out_split({"train": 5, "iid": 2, "ood": 1}, "x") == "iid"
    assert held_out_split({"train": 5, "unseen_train": 3, "unseen": 2, "seen": 1}, "x") == "seen"
    with pytest.raises(ConfigError, match=r"no held-out split .* \['train'\]"):
        held_out_split({"train": 5, "test": 0}, "x")


def test_set_values_that_differ_are_refused_naming_the_override(tmp_path):
    shards = _bbbc021_shards(tmp_path)
    c = resolve("bbbc021", [f"data.shards={shards}", "eval.split=test"])  # the preset's 96 px
    with pytest.raises(ConfigError, match=r"data.image_size=96 but the shards in .* hold 16x16 images: set "
                                          r"data.image_size=16 \(or 0: the manifest's"):
        preflight(c)
    c = resolve("bbbc021", [f"data.shards={shards}", "data.image_size=0", "data.channels=6"])
    with pytest.raises(ConfigError, match=r"data.channels=6 but .* 3-channel images: set data.channels=3"):
        preflight(c)
    c = resolve("bbbc021", [f"data.shards={shards}", "data.image_size=0"])  # eval.split=seen: the resplit layout
    with pytest.raises(ConfigError, match=r"eval.split='seen' has no images .* \['test', 'train'\]\); set eval.split"):
        preflight_eval(c)


def test_nothing_to_take_the_values_from(tmp_path):
    with pytest.raises(ConfigError, match=r"data.image_size=0 take their values from the manifest of "
                                          r"data.shards='.*nowhere'.*does not exist.*phenoflow data convert"):
        resolve("bbbc021", [f"data.shards={tmp_path / 'nowhere'}", "data.image_size=0"])
    with pytest.raises(ConfigError, match=r"data.channels=0 take the shape from the manifest of data.shards, but "
                                          r"data.source='synthetic'"):
        resolve("demo", ["data.channels=0"])
    assert resolve("demo", ["eval.split="]).eval.split == "val"


def test_cli_train_takes_the_manifest_or_names_the_mismatch(tmp_path):
    shards = _bbbc021_shards(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "phenoflow", "train", "--preset", "bbbc021", f"data.shards={shards}",
            f"run.out_dir={tmp_path / 'runs'}"]
    r = subprocess.run([*base, "data.image_size=0", "data.channels=0", "eval.split=", "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "image_size: 16" in r.stdout and "channels: 3" in r.stdout and "split: test" in r.stdout
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 2 and "set data.image_size=16" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()  # refused before anything is written
