"""Bad shard data: a clear error naming shard and key by default; with the skip policy, counted and logged."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest

from phenoflow.data.loader import ShardLoader
from phenoflow.data.shards import (
    MissingShardError,
    ShardError,
    build_manifest,
    index_tar,
    write_manifest,
    write_shards,
)
from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic
from phenoflow.data.vocab import Vocab

SHAPE = (16, 16, 6)


def _meta(key, **kw):
    m = {"key": key, "shape": list(SHAPE), "dtype": "uint8", "encoding": "raw", "perturbation": "control",
         "experiment": "exp_01", "cell_type": "U2OS", "dose": 0.0, "smiles": None, "is_control": True,
         "split": "train"}
    m.update(kw)
    return m


def _hand_made(folder, members):
    """A shard written member by member (to break it on purpose), its index and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index_tar(folder / "train-000000.tar")
    n = len({name.split(".")[0] for name, _ in members})
    rec = {"name": "train-000000.tar", "index": "train-000000.idx", "split": "train", "count": n,
           "bytes": (folder / "train-000000.tar").stat().st_size, "sha256": ""}
    vocabs = {"perturbation": Vocab(["control", "g1"]), "experiment": Vocab(["exp_01"]), "cell_type": Vocab(["U2OS"])}
    write_manifest(folder, build_manifest({"train": [rec]}, vocabs, SHAPE, [f"c{i}" for i in range(6)]))
    return folder


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _good(key):
    return [(f"{key}.json", json.dumps(_meta(key)).encode()), (f"{key}.img", bytes(np.prod(SHAPE)))]


def _without(key, field):
    m = _meta(key)
    del m[field]
    return [(f"{key}.json", json.dumps(m).encode()), (f"{key}.img", bytes(np.prod(SHAPE)))]


CASES = {
    "wrong-size image": [("bad.json", json.dumps(_meta("bad")).encode()), ("bad.img", b"\0" * 100)],
    "missing image": [("bad.json", json.dumps(_meta("bad")).encode())],
    "unknown label": [("bad.json", json.dumps(_meta("bad", perturbation="zzz")).encode()),
                      ("bad.img", bytes(np.prod(SHAPE)))],
    "NaN dose": [("bad.json", json.dumps(_meta("bad", dose=float("nan"))).encode()),
                 ("bad.img", bytes(np.prod(SHAPE)))],
    "float pixels": [("bad.json", json.dumps(_meta("bad", encoding="npy")).encode()),
                     ("bad.npy", _npy_bytes(np.full(SHAPE, np.nan, np.float32)))],
    # The writer always records dose and is_control: a missing one is an error, not dose 0.0 / not a control.
    "missing dose": _without("bad", "dose"),
    "missing is_control": _without("bad", "is_control"),
    "null dose": [("bad.json", json.dumps(_meta("bad", dose=None)).encode()), ("bad.img", bytes(np.prod(SHAPE)))],
}
MESSAGES = {"wrong-size image": "100 bytes, expected 16\\*16\\*6", "missing image": "missing json or image member",
            "unknown label": "'zzz'.*perturbation vocabulary", "NaN dose": "dose nan is not finite",
            "float pixels": "dtype float32", "missing dose": "metadata lacks 'dose'",
            "missing is_control": "metadata lacks 'is_control'", "null dose": "dose None is not a number"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_error_names_shard_and_key(tmp_path, case):
    folder = _hand_made(tmp_path / case.replace(" ", "_"), _good("a") + CASES[case] + _good("c"))
    loader = ShardLoader(folder, "train", 3, shuffle=False, drop_last=False, infinite=False)
    with pytest.raises(ShardError, match=f"shard train-000000.tar, key bad: .*{MESSAGES[case]}"):
        list(loader)


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_policy_counts_and_logs(tmp_path, case, caplog):
    folder = _hand_made(tmp_path / case.replace(" ", "_"), _good("a") + CASES[case] + _good("c"))
    loader = ShardLoader(folder, "train", 3, shuffle=False, drop_last=False, infinite=False,
                         bad_sample_policy="skip")
    with caplog.at_level(logging.WARNING, logger="phenoflow.data"):
        batches = list(loader)
    assert [b["key"] for b in batches] == [["a", "c"]]
    assert loader.skipped == 1 and loader.state_dict()["skipped"] == 1
    assert "key bad" in caplog.text and "key bad" in loader.skipped_log[0]


def test_truncated_tar(tmp_path):
    spec = SyntheticSpec(image_size=16, num_perturbations=2, num_experiments=1)
    images, meta = generate_synthetic(spec, 10)
    write_shards(images, meta, tmp_path, samples_per_shard=10)
    tar = tmp_path / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    loader = ShardLoader(tmp_path, "train", 10, shuffle=False, drop_last=False, infinite=False)
    with pytest.raises(ShardError, match="shard train-000000.tar, key train_0000000[5-9]: .*truncated"):
        list(loader)
    skip = ShardLoader(tmp_path, "train", 10, shuffle=False, drop_last=False, infinite=False,
                       bad_sample_policy="skip")
    (b,) = list(skip)
    assert 0 < len(b["key"]) < 10 and skip.skipped == 10 - len(b["key"])
    assert b["image"].numpy().transpose(0, 2, 3, 1).tobytes() == images[:len(b["key"])].tobytes()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_missing_shard_or_index_is_always_an_error(tmp_path, policy):
    spec = SyntheticSpec(image_size=16, num_perturbations=2, num_experiments=1)
    images, meta = generate_synthetic(spec, 10)
    write_shards(images, meta, tmp_path / "a", samples_per_shard=5)
    write_shards(images, meta, tmp_path / "b", samples_per_shard=5)
    (tmp_path / "a" / "train-000000.tar").unlink()
    (tmp_path / "b" / "train-000001.idx").unlink()
    kw = {"shuffle": False, "drop_last": False, "infinite": False, "bad_sample_policy": policy}
    with pytest.raises(MissingShardError, match="train-000000.tar listed in the manifest is missing"):
        list(ShardLoader(tmp_path / "a", "train", 5, **kw))
    with pytest.raises(MissingShardError, match="train-000001.idx is missing"):
        list(ShardLoader(tmp_path / "b", "train", 5, **kw))
