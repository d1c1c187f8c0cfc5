"""Silent corruption is caught: per-sample crc32 in the label tables checked by the loader (first pass / always),
`data verify` checks the index against the tar members, and every decode failure goes through the bad-sample
policy with shard and key (issue 10, items 3 and 4)."""
import json
import logging
import subprocess
import sys

import pytest

from phenoflow.data.errors import (
    ChecksumError,
    DataError,
    MissingShardError,
    ShardError,
)
from phenoflow.data.integrity import verify_shards
from phenoflow.data.loader import ShardLoader
from phenoflow.data.prepare import write_synthetic
from phenoflow.data.shards import index_rows, load_manifest, read_index, write_manifest
from phenoflow.data.synthetic import SyntheticSpec
from phenoflow.errors import PhenoflowError


def _write(folder, encoding="raw", n=40, per_shard=10, channels=6):
    spec = SyntheticSpec(image_size=16, channels=channels, num_perturbations=3, num_experiments=2)
    write_synthetic(spec, folder, {"train": n}, samples_per_shard=per_shard, encoding=encoding)
    return folder


def _record(folder, shard_no):
    return load_manifest(folder)["splits"]["train"]["shards"][shard_no]


def _damage(folder, shard_no, j, member="img", at=0.5, data=None):
    """Flip one byte (or write `data`) inside member `member` of sample j of a shard; returns (shard, key)."""
    rec = _record(folder, shard_no)
    e = read_index(folder / rec["index"])[j]
    off, size = e[member]
    with open(folder / rec["name"], "r+b") as f:
        if data is None:
            f.seek(off + int(size * at))
            b = f.read(1)
            f.seek(off + int(size * at))
            f.write(bytes([b[0] ^ 0x5A]))
        else:
            f.seek(off)
            f.write(data[:size].ljust(size, b" "))
    return rec["name"], e["__key__"]


def _epoch(folder, **kw):
    kw = {"shuffle": False, "drop_last": False, "infinite": False, **kw}
    loader = ShardLoader(folder, "train", 8, **kw)
    return loader, [k for b in loader for k in b["key"]]


def _strip_checksums(folder):
    """The folder as written before checksums existed: no crc32 column, no "checksum" in the manifest."""
    m = load_manifest(folder)
    for rec in m["splits"]["train"]["shards"]:
        rec.pop("checksum")
        t = json.loads((folder / rec["labels"]).read_text())
        del t["crc32"]
        (folder / rec["labels"]).write_text(json.dumps(t))
    write_manifest(folder, m)
    return folder


# -- item 3: checksums ------------------------------------------------------------------------------------


def test_writer_records_checksums(tmp_path):
    folder = _write(tmp_path / "d")
    for rec in load_manifest(folder)["splits"]["train"]["shards"]:
        assert rec["checksum"] == "crc32"
        t = json.loads((folder / rec["labels"]).read_text())
        assert len(t["crc32"]) == rec["count"] and all(isinstance(x, int) for x in t["crc32"])
    # The index stays exactly what DALI's wds2idx writes: no extra fields.
    rows = index_rows(folder / _record(folder, 0)["index"])
    assert all([m[0] for m in r] == ["json", "img"] for r in rows)


@pytest.mark.parametrize("encoding", ["raw", "png", "npy"])
@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_payload_byte_is_caught(tmp_path, encoding, workers):
    folder = _write(tmp_path / "d", encoding, channels=3 if encoding == "npy" else 6)
    shard, key = _damage(folder, 2, 3, member={"raw": "img"}.get(encoding, encoding), at=0.9)
    with pytest.raises(ChecksumError, match=f"shard {shard}, key {key}: the image bytes read have crc32"):
        _epoch(folder, num_workers=workers)
    loader, keys = _epoch(folder, num_workers=workers, bad_sample_policy="skip")
    assert key not in keys and len(keys) == 39 and loader.skipped == 1
    assert f"shard {shard}, key {key}" in loader.skipped_log[0]
    with pytest.raises(ChecksumError, match=f"key {key}: the image member's crc32 is"):
        verify_shards(folder)


def test_checksum_policies(tmp_path):
    """first_pass checks each sample until it has passed once; always checks every read; off never does."""
    folder = _write(tmp_path / "d")
    for policy, caught_in_second_epoch in [("always", True), ("first_pass", False), ("off", False)]:
        it = iter(ShardLoader(folder, "train", 8, shuffle=False, checksums=policy))
        assert len({k for _ in range(5) for k in next(it)["key"]}) == 40  # one clean epoch
        shard, key = _damage(folder, 1, 0)
        try:
            if caught_in_second_epoch:
                with pytest.raises(ChecksumError, match=f"shard {shard}, key {key}"):
                    [next(it) for _ in range(5)]
            else:
                assert len([next(it) for _ in range(5)]) == 5
        finally:
            _damage(folder, 1, 0)  # flip it back
    _damage(folder, 1, 0)
    with pytest.raises(ChecksumError):  # a new loader's first pass
        _epoch(folder)
    assert len(_epoch(folder, checksums="off")[1]) == 40  # off: reads the damaged bytes without a word
    with pytest.raises(ValueError, match="checksums='sometimes' must be one of"):
        ShardLoader(folder, "train", 8, checksums="sometimes")


def _shift_image_offsets(folder, shard_no):
    """A stale index: every image entry points at the next sample's image (sizes equal, json entries intact)."""
    rec = _record(folder, shard_no)
    lines = (folder / rec["index"]).read_text().splitlines()
    fields = [ln.split() for ln in lines[1:]]
    offs = [f[5] for f in fields]
    for f, o in zip(fields, offs[1:] + offs[:1]):
        f[5] = o
    (folder / rec["index"]).write_text("\n".join([lines[0], *(" ".join(f) for f in fields)]) + "\n")
    return rec["name"], fields[0][3].split(".")[0]


def test_stale_index_fails_verify_and_loading(tmp_path):
    folder = _write(tmp_path / "d")
    shard, first_key = _shift_image_offsets(folder, 2)
    for checksums in (True, False):  # the index check reads tar headers only: in the quick pass too
        with pytest.raises(ShardError, match=f"shard .*{shard}: its index .* does not match the tar at key "
                                             f"{first_key} \\(sample 0\\).*phenoflow data index"):
            verify_shards(folder, checksums=checksums)
    with pytest.raises(ChecksumError, match=f"shard {shard}, key {first_key}"):
        _epoch(folder)
    # The rebuilt index passes, and the loader reads the right bytes again.
    from phenoflow.data.shards import index_tar

    index_tar(folder / shard)
    assert verify_shards(folder) == {"train": 40}
    assert len(_epoch(folder)[1]) == 40


def test_index_kept_from_before_a_rewrite_fails_verify(tmp_path):
    """The tar rewritten (longer json members: every offset moves), the old index left beside it."""
    folder = _write(tmp_path / "d")
    old = {r["index"]: (folder / r["index"]).read_text() for r in load_manifest(folder)["splits"]["train"]["shards"]}
    spec = SyntheticSpec(image_size=16, channels=6, num_perturbations=3, num_experiments=2, compounds=True)
    write_synthetic(spec, folder, {"train": 40}, samples_per_shard=10)
    for name, text in old.items():
        (folder / name).write_text(text)
    with pytest.raises(ShardError, match="train-000000.tar: its index train-000000.idx does not match the tar at "
                                         "key train_00000000 \\(sample 0\\): the index says train_00000000.json@512"):
        verify_shards(folder, checksums=False)


def test_folder_without_checksums_loads_and_logs_once(tmp_path, caplog):
    folder = _strip_checksums(_write(tmp_path / "d"))
    _damage(folder, 0, 0)  # undetectable without checksums: exactly why the warning exists
    with caplog.at_level(logging.WARNING, logger="phenoflow.data"):
        loader = ShardLoader(folder, "train", 8, shuffle=False, num_workers=2)
        it = iter(loader)
        keys = [k for _ in range(10) for k in next(it)["key"]]
    assert len(keys) == 80
    msgs = [r.getMessage() for r in caplog.records if "no per-sample checksums" in r.getMessage()]
    assert len(msgs) == 1 and "4 of 4 shards" in msgs[0] and "phenoflow data labels" in msgs[0]
    # `data labels` adds checksums of the bytes as they are now (verify first: its sha256 check vouches for them).
    r = subprocess.run([sys.executable, "-m", "phenoflow.cli", "data", "labels", str(folder)], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert all(rec["checksum"] == "crc32" for rec in load_manifest(folder)["splits"]["train"]["shards"])
    assert len(_epoch(folder)[1]) == 40
    _damage(folder, 0, 0)  # any later change is caught
    with pytest.raises(ChecksumError):
        _epoch(folder)


def test_manifest_promising_checksums_needs_the_column(tmp_path):
    folder = _write(tmp_path / "d")
    rec = _record(folder, 1)
    t = json.loads((folder / rec["labels"]).read_text())
    del t["crc32"]
    (folder / rec["labels"]).write_text(json.dumps(t))
    with pytest.raises(MissingShardError, match=f"column 'crc32' has no entries.*phenoflow data labels {folder}"):
        _epoch(folder, bad_sample_policy="skip")


# -- item 4: decode failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "garbage", "message"), [
    ("png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "the png member does not decode"),
    ("png", b"not a png at all", "the png member does not decode"),
    ("npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<u1', 'fortran_order': False, 'shape': (9999,), }", "npy member"),
])
def test_decode_failures_follow_the_policy(tmp_path, encoding, garbage, message):
    """Without checksums (an older folder) a corrupt payload reaches the decoder: a ShardError naming shard and
    key under the error policy, a counted skip under the skip policy (not a bare OSError)."""
    folder = _strip_checksums(_write(tmp_path / "d", encoding, channels=3 if encoding == "npy" else 6))
    shard, key = _damage(folder, 1, 2, member=encoding, data=garbage)
    for workers in (0, 2):
        with pytest.raises(ShardError, match=f"shard {shard}, key {key}: .*{message}"):
            _epoch(folder, num_workers=workers)
        loader, keys = _epoch(folder, num_workers=workers, bad_sample_policy="skip")
        assert key not in keys and len(keys) == 39 and loader.skipped == 1


def test_corrupt_json_member_follows_the_policy(tmp_path):
    folder = _write(tmp_path / "d")
    m = load_manifest(folder)
    for rec in m["splits"]["train"]["shards"]:  # no tables: labels come from the json members
        rec.pop("labels")
    write_manifest(folder, m)
    shard, key = _damage(folder, 0, 5, member="json", data=b"[1, 2")
    with pytest.raises(ShardError, match=f"shard {shard}, key {key}"):
        _epoch(folder)
    loader, keys = _epoch(folder, bad_sample_policy="skip")
    assert key not in keys and loader.skipped == 1


def test_dali_backend_host_side_errors_name_shard_and_key(tmp_path):
    pytest.importorskip("nvidia.dali")
    folder = _write(tmp_path / "d")
    shard, key = _damage(folder, 1, 4, member="json", data=b"{not json")
    with pytest.raises(ShardError, match=f"shard {shard}, key {key}: json member does not parse"):
        _epoch(folder, backend="dali")
    loader, keys = _epoch(folder, backend="dali", bad_sample_policy="skip")
    assert key not in keys and len(keys) == 39 and loader.skipped == 1


# -- item 10: one exception family ------------------------------------------------------------------------


def test_data_errors_are_phenoflow_errors(tmp_path):
    folder = _write(tmp_path / "d")
    _damage(folder, 0, 0)
    with pytest.raises(PhenoflowError) as e:
        verify_shards(folder)
    assert isinstance(e.value, DataError) and isinstance(e.value, ValueError)
    with pytest.raises(DataError, match="no shard manifest at"):
        verify_shards(tmp_path / "nothing")
    rec = _record(folder, 0)
    (folder / rec["labels"]).unlink()
    with pytest.raises(MissingShardError, match=f"listed in the manifest is missing \\(rebuild the folder's tables "
                                                f"with `phenoflow data labels {folder}`\\)"):
        _epoch(folder)
