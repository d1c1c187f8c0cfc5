"""Shard format v1: round trips per encoding, manifest contents, DALI-compatible index, webdataset compatibility."""
import json
import tarfile

import numpy as np
import pytest

from phenoflow.data.integrity import verify_shards
from phenoflow.data.shards import (
    ShardWriter,
    decode_image,
    encode_image,
    iter_shard,
    load_manifest,
    manifest_vocabs,
    read_index,
    write_shards,
)
from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic
from phenoflow.data.vocab import UnknownLabelError, Vocab


def _data(n=23, size=16, channels=6):
    spec = SyntheticSpec(image_size=size, channels=channels, num_perturbations=3, num_experiments=2)
    a, ma = generate_synthetic(spec, n, "train")
    b, mb = generate_synthetic(spec, 5, "val")
    return np.concatenate([a, b]), ma + mb


@pytest.mark.parametrize("encoding,channels", [("raw", 6), ("npy", 6), ("png", 6), ("png", 3)])
def test_round_trip_bytes_and_labels_exact(tmp_path, encoding, channels):
    images, meta = _data(channels=channels)
    man = write_shards(images, meta, tmp_path, samples_per_shard=10, encoding=encoding)
    assert [s["count"] for s in man["splits"]["train"]["shards"]] == [10, 10, 3]
    got = []
    for split in ("train", "val"):
        for rec in man["splits"][split]["shards"]:
            got += list(iter_shard(tmp_path, rec, man["image_shape"]))
    assert len(got) == len(meta)
    for (img, m), ref, ref_m in zip(got, images, meta):
        assert img.tobytes() == ref.tobytes()
        for k in ("key", "perturbation", "experiment", "cell_type", "dose", "smiles", "is_control", "split"):
            assert m[k] == ref_m[k]
        assert m["shape"] == list(ref.shape) and m["dtype"] == "uint8" and m["encoding"] == encoding


def test_manifest_contents(tmp_path):
    images, meta = _data()
    write_shards(images, meta, tmp_path, samples_per_shard=8)
    m = load_manifest(tmp_path)
    assert m["version"] == 1 and m["image_shape"] == [16, 16, 6] and m["encoding"] == "raw"
    assert m["channels"] == ["DNA", "ER", "actin", "RNA", "mito", "golgi_membrane"]
    assert m["splits"]["train"]["count"] == 23 and m["splits"]["val"]["count"] == 5
    v = manifest_vocabs(m)
    assert v["perturbation"].names[0] == "control" and len(v["perturbation"]) == 4
    assert v["experiment"].names == ["exp_01", "exp_02"] and v["cell_type"].names == ["U2OS"]
    assert sum(m["label_counts"]["train"]["perturbation"].values()) == 23
    assert all(len(s["sha256"]) == 64 for s in m["splits"]["train"]["shards"])
    assert verify_shards(tmp_path) == {"train": 23, "val": 5}
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_index_matches_dali_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    images, meta = _data()
    man = write_shards(images, meta, tmp_path, samples_per_shard=10)
    rec = man["splits"]["train"]["shards"][0]
    with wds2idx.IndexCreator(str(tmp_path / rec["name"]), str(tmp_path / "dali.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "dali.idx").read_text() == (tmp_path / rec["index"]).read_text()
    assert len(read_index(tmp_path / rec["index"])) == 10


def test_readable_by_webdataset_and_tarfile(tmp_path):
    wds = pytest.importorskip("webdataset")
    images, meta = _data()
    man = write_shards(images, meta, tmp_path, samples_per_shard=10)
    urls = [str(tmp_path / r["name"]) for r in man["splits"]["train"]["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == [m["key"] for m in meta[:23]]
    assert decode_image(got[4]["img"], "img", (16, 16, 6)).tobytes() == images[4].tobytes()
    assert json.loads(got[4]["json"])["perturbation"] == meta[4]["perturbation"]
    with tarfile.open(urls[0]) as tf:
        assert tf.getnames()[:2] == ["train_00000000.json", "train_00000000.img"]


def test_unknown_label_and_bad_input_errors(tmp_path):
    images, meta = _data()
    vocabs = {"perturbation": Vocab(["control"], "perturbation"), "experiment": Vocab(["exp_01", "exp_02"]),
              "cell_type": Vocab(["U2OS"])}
    with pytest.raises(UnknownLabelError, match="gene_01.*perturbation"):
        write_shards(images, meta, tmp_path, vocabs=vocabs)
    with pytest.raises(ValueError, match="key"):
        ShardWriter(tmp_path, "train", 4).write(images[0], {**meta[0], "key": "a.b"})
    with pytest.raises(ValueError, match="expected 16\\*16\\*6"):
        decode_image(b"\0" * 10, "img", (16, 16, 6))
    with pytest.raises(ValueError, match="shape"):
        decode_image(encode_image(images[0][:8], "npy"), "npy", (16, 16, 6))


def test_failed_writer_leaves_no_shard(tmp_path):
    images, meta = _data()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", 100) as w:
        w.write(images[0], meta[0])
        raise RuntimeError("crash")
    assert not list(tmp_path.iterdir())


def test_vocab_round_trip(tmp_path):
    v = Vocab.build(["b", "control", "a"], "perturbation", first="control")
    assert v.names == ["control", "a", "b"] and v.index("b") == 2 and len(v) == 3
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == v and Vocab.from_json(v.to_json()) == v
    with pytest.raises(ValueError, match="'zz'.*perturbation"):
        v.index("zz")
