"""Per-shard label tables: written with every shard, equal to the json members, used by the loader (same batches
as the json path), bad entries reported by shard and key (or skipped and counted), and checked by verify."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from phenoflow.data.integrity import label_table_from_tar, verify_shards
from phenoflow.data.loader import ShardLoader
from phenoflow.data.prepare import write_synthetic
from phenoflow.data.shards import (
    LABEL_COLUMNS,
    ShardError,
    index_array,
    load_manifest,
    read_index,
    read_label_table,
    write_manifest,
)
from phenoflow.data.synthetic import SyntheticSpec


def _write(folder, encoding="raw", n=90, per_shard=25):
    spec = SyntheticSpec(image_size=16, channels=6, num_perturbations=4, num_experiments=2, compounds=True)
    write_synthetic(spec, folder, {"train": n}, samples_per_shard=per_shard, encoding=encoding)
    return folder


def _records(folder):
    return load_manifest(folder)["splits"]["train"]["shards"]


def _without_tables(src, dst):
    """A copy of the folder whose manifest lists no label tables (the loader then reads every json member)."""
    import shutil

    shutil.copytree(src, dst)
    m = load_manifest(dst)
    for rec in m["splits"]["train"]["shards"]:
        del rec["labels"]
    write_manifest(dst, m)
    return dst


def _all_batches(folder, **kw):
    return list(ShardLoader(folder, "train", 8, infinite=False, seed=3, drop_last=False, **kw))


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_tables_written_and_equal_to_json_members(tmp_path, encoding):
    folder = _write(tmp_path / "d", encoding)
    for rec in _records(folder):
        assert (folder / rec["labels"]).exists()
        table = read_label_table(folder / rec["labels"], rec["count"])
        assert table == label_table_from_tar(folder, rec)
        assert table["key"] == [e["__key__"] for e in read_index(folder / rec["index"])]
    assert any(d != 0.0 for rec in _records(folder) for d in read_label_table(folder / rec["labels"],
                                                                               rec["count"])["dose"])


@pytest.mark.parametrize("encoding", ["raw", "png"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_loader_same_batches_with_and_without_tables(tmp_path, encoding, channels_last):
    folder = _write(tmp_path / "d", encoding)
    plain = _without_tables(folder, tmp_path / "plain")
    a, b = _all_batches(folder, channels_last=channels_last), _all_batches(plain, channels_last=channels_last)
    assert len(a) == len(b) > 5
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for k in ("image", "perturbation", "experiment", "cell_type", "dose", "is_control"):
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _edit_table(folder, shard_no, j, column, value):
    rec = _records(folder)[shard_no]
    path = folder / rec["labels"]
    t = json.loads(path.read_text())
    t[column][j] = value
    path.write_text(json.dumps(t))
    return rec["name"], t["key"][j]


@pytest.mark.parametrize(("column", "value", "message"), [
    ("perturbation", "zzz", "unknown perturbation label 'zzz'"),
    ("dose", float("nan"), "dose nan is not finite"),
    ("dose", "abc", "dose 'abc' is not a number"),
    ("is_control", None, "lacks 'is_control'"),
])
def test_bad_table_entry_error_and_skip(tmp_path, column, value, message):
    folder = _write(tmp_path / "d")
    shard, key = _edit_table(folder, 1, 4, column, value)
    with pytest.raises(ShardError, match=f"shard {shard}, key {key}: .*{message}"):
        _all_batches(folder)
    loader = ShardLoader(folder, "train", 8, infinite=False, seed=3, drop_last=False, bad_sample_policy="skip")
    keys = [k for b in loader for k in b["key"]]
    assert key not in keys and len(keys) == 89 and loader.skipped == 1
    assert shard in loader.skipped_log[0] and key in loader.skipped_log[0]


def test_table_problems_are_errors_even_when_skipping(tmp_path):
    folder = _write(tmp_path / "d")
    rec = _records(folder)[0]
    t = json.loads((folder / rec["labels"]).read_text())
    t["key"][0], t["key"][1] = t["key"][1], t["key"][0]
    (folder / rec["labels"]).write_text(json.dumps(t))
    with pytest.raises(ShardError, match=f"shard {rec['name']}: its label table lists key"):
        _all_batches(folder, bad_sample_policy="skip", shuffle=False)
    t["key"][0], t["key"][1] = t["key"][1], t["key"][0]
    t["dose"] = t["dose"][:-1]
    (folder / rec["labels"]).write_text(json.dumps(t))
    with pytest.raises(ShardError, match=r"column 'dose' has 24 entries, the shard has 25"):
        _all_batches(folder, bad_sample_policy="skip", shuffle=False)
    (folder / rec["labels"]).unlink()
    with pytest.raises(ShardError, match=r"label table .*labels.json listed in the manifest is missing"):
        _all_batches(folder, bad_sample_policy="skip", shuffle=False)


def test_verify_compares_tables_with_json_members(tmp_path):
    folder = _write(tmp_path / "d")
    assert verify_shards(folder) == {"train": 90}
    _, key = _edit_table(folder, 2, 7, "experiment", "exp_99")
    with pytest.raises(ShardError, match=f"experiment of key {key} is 'exp_99', its json member says"):
        verify_shards(folder)
    verify_shards(folder, checksums=False)  # the quick pass checks files and counts only


def test_labels_command_rebuilds_tables(tmp_path):
    folder = _write(tmp_path / "d")
    reference = _all_batches(folder)
    plain = _without_tables(folder, tmp_path / "plain")
    for rec in _records(folder):
        (plain / rec["labels"]).unlink()
    r = subprocess.run([sys.executable, "-m", "phenoflow.cli", "data", "labels", str(plain)],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 4 label tables" in r.stdout
    assert all(rec["labels"] for rec in _records(plain))
    rebuilt = _all_batches(plain)
    assert [b["key"] for b in rebuilt] == [b["key"] for b in reference]
    assert all(torch.equal(x["dose"], y["dose"]) for x, y in zip(rebuilt, reference))


def test_index_array_matches_read_index(tmp_path):
    folder = _write(tmp_path / "d", n=30, per_shard=30)
    rec = _records(folder)[0]
    arr, keys = index_array(folder / rec["index"])
    entries = read_index(folder / rec["index"])
    assert keys == [e["__key__"] for e in entries]
    assert arr.tolist() == [[*e["json"], *e["img"], 0] for e in entries]
    # An irregular index (a sample without its json member) takes the general parser: a -1 row.
    lines = (folder / rec["index"]).read_text().splitlines()
    first = lines[1].split()
    lines[1] = " ".join(first[4:])
    (folder / rec["index"]).write_text("\n".join(lines) + "\n")
    arr2, keys2 = index_array(folder / rec["index"])
    assert arr2[0].tolist() == [-1, 0, -1, 0, -1] and np.array_equal(arr2[1:], arr[1:]) and keys2 == keys


def test_label_columns_cover_what_the_loader_needs():
    assert set(LABEL_COLUMNS) == {"key", "perturbation", "experiment", "cell_type", "dose", "is_control"}
