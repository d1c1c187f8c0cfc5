"""`data convert` failures (issue 10, items 2b, 10 and 11): image paths outside --images are refused, every bad row
is reported at once in one ConvertError (a PhenoflowError), BOM and ragged rows, and a failed conversion (bad rows,
a worker that raises, a worker that is killed) leaves no shards or temporary files in --out."""
import argparse
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from phenoflow.data import commands
from phenoflow.data.convert import convert
from phenoflow.data.errors import ConvertError, DataError
from phenoflow.data.integrity import verify_shards
from phenoflow.data.shards import load_manifest
from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic
from phenoflow.errors import PhenoflowError


def _img(size=16):
    return generate_synthetic(SyntheticSpec(image_size=size), 1)[0][0]


def _csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _leftovers(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# -- item 2b ----------------------------------------------------------------------------------------------


def test_paths_outside_the_image_root_are_refused(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    np.save(root / "ok.npy", _img())
    np.save(tmp_path / "secret.npy", _img())
    rows = [{"path": "ok.npy", "perturbation": "a"}, {"path": "../secret.npy", "perturbation": "b"},
            {"path": str(tmp_path / "secret.npy"), "perturbation": "c", },
            {"path": "sub/../ok.npy", "perturbation": "d"}]  # `..` that stays inside is fine
    for i, r in enumerate(rows):
        r["key"] = f"k{i}"
    _csv(root / "g.csv", rows)
    with pytest.raises(ConvertError) as e:
        convert("generic", root / "g.csv", tmp_path / "out", image_root=root)
    msg = str(e.value)
    assert "2 bad rows" in msg
    assert f"g.csv, row 3, column path, value '../secret.npy': the image path {tmp_path / 'secret.npy'} is outside " \
           f"the image root {root}" in msg and "--allow-outside-images" in msg
    assert f"row 4, column path, value '{tmp_path / 'secret.npy'}'" in msg
    assert [p["row"] for p in e.value.problems] == [3, 4]
    assert not (tmp_path / "out").exists()  # refused before anything is written
    s = convert("generic", root / "g.csv", tmp_path / "out", image_root=root, allow_outside_images=True)
    assert s["splits"] == {"train": 4}
    # The CLI flag, and the cellflux layout's PATH column.
    _csv(tmp_path / "cf.csv", [{"SAMPLE_KEY": "a_b_c", "SPLIT": "train", "CPD_NAME": "x", "BATCH": "b",
                                "PATH": "../secret.npy"}])
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    base = ["data", "convert", "cellflux", "--csv", str(tmp_path / "cf.csv"), "--images", str(root)]
    args = parser.parse_args([*base, "--out", str(tmp_path / "cf")])
    with pytest.raises(ConvertError, match="row 2, column PATH, value '../secret.npy': the image path .* is outside"):
        args.func(args)
    args = parser.parse_args([*base, "--out", str(tmp_path / "cf2"), "--allow-outside-images"])
    assert args.func(args) == 0 and verify_shards(tmp_path / "cf2") == {"train": 1}


# -- item 11 ----------------------------------------------------------------------------------------------


def _bad_images(tmp_path):
    img = _img()
    np.save(tmp_path / "ok0.npy", img)
    np.save(tmp_path / "ok1.npy", img)
    f = img.astype(np.float32)
    f[3, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", f)
    np.save(tmp_path / "big.npy", img.astype(np.int32) + 300)
    np.save(tmp_path / "small.npy", img[:8])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    names = ["ok0.npy", "nan.npy", "ok1.npy", "big.npy", "small.npy", "missing.npy", "broken.png"]
    return _csv(tmp_path / "g.csv", [{"path": n, "perturbation": "p"} for n in names])


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_image_row_is_reported_then_nothing_is_left(tmp_path, workers):
    csv_path = _bad_images(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert("generic", csv_path, out, samples_per_shard=2, workers=workers)
    err = e.value
    assert isinstance(err, DataError) and isinstance(err, PhenoflowError) and isinstance(err, ValueError)
    assert [(p["row"], p["column"], p["value"]) for p in err.problems] == [
        (3, "path", "nan.npy"), (5, "path", "big.npy"), (6, "path", "small.npy"), (7, "path", "missing.npy"),
        (8, "path", "broken.png")]
    msg = str(err)
    assert msg.startswith(f"{csv_path}: 5 bad rows; nothing was written")
    for line, reason in [(3, "NaN"), (5, "out of range"), (6, "wrong shape"), (7, "missing file"),
                         (8, "unreadable file")]:
        assert f"g.csv, row {line}, column path, value " in msg and reason in msg
    assert _leftovers(out) == []  # no shard of the good rows, no temporary file, no manifest
    s = convert("generic", csv_path, out, samples_per_shard=2, workers=workers, bad_sample_policy="skip")
    assert s["splits"] == {"train": 2} and s["skipped"] == 5


def test_every_bad_csv_row_is_reported_before_any_image_is_read(tmp_path):
    np.save(tmp_path / "x.npy", _img())
    (tmp_path / "g.csv").write_text(
        "path,perturbation,dose\n"
        "x.npy,a,1\n"            # row 2: fine
        "x.npy,,1\n"             # row 3: empty perturbation
        "x.npy,a,lots\n"         # row 4: dose not a number
        "x.npy,a,1,surplus\n"    # row 5: ragged (an extra field)
        "x.npy,a\n"              # row 6: ragged (a field short)
        "x.npy,a,-2\n")          # row 7: negative dose
    with pytest.raises(ConvertError) as e:
        convert("generic", tmp_path / "g.csv", tmp_path / "out")
    assert [(p["row"], p["column"]) for p in e.value.problems] == [
        (3, "perturbation"), (4, "dose"), (5, "(after the last)"), (6, "dose"), (7, "dose")]
    msg = str(e.value)
    assert "5 bad rows; nothing was read or written" in msg
    assert "row 4, column dose, value 'lots': dose 'lots' is not a number" in msg
    assert "row 5, column (after the last), value ['surplus']: 4 fields, the header has 3 (a ragged row" in msg
    assert "row 6, column dose, value None: 2 fields, the header has 3" in msg
    assert not (tmp_path / "out").exists()
    # Duplicate keys: every later row naming the first.
    (tmp_path / "k.csv").write_text("path,perturbation,key\nx.npy,a,k.1\nx.npy,a,k/1\nx.npy,a,k_1\n")
    with pytest.raises(ConvertError, match=r"(?s)row 3, column key, value 'k/1': gives the same sample key 'k_1' as "
                                           r"row 2.*row 4, column key, value 'k_1': gives the same"):
        convert("generic", tmp_path / "k.csv", tmp_path / "out")


def test_csv_with_a_byte_order_mark(tmp_path):
    np.save(tmp_path / "x.npy", _img())
    _csv(tmp_path / "bom.csv", [{"path": "x.npy", "perturbation": "a"}], encoding="utf-8-sig")
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbfpath")
    s = convert("generic", tmp_path / "bom.csv", tmp_path / "out")
    assert s["splits"] == {"train": 1}
    (tmp_path / "latin.csv").write_bytes("path,perturbation\nx.npy,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConvertError, match="latin.csv: not UTF-8 text"):
        convert("generic", tmp_path / "latin.csv", tmp_path / "out2")


def _many_rows(tmp_path, n=1200, size=96):
    """n rows (distinct keys) of one 96x96x6 crop: PNG encoding makes each shard take a while to write."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (size, size, 6), dtype=np.uint8))
    return _csv(tmp_path / "g.csv", [{"path": "x.npy", "perturbation": "a", "key": f"k{i}"} for i in range(n)])


def _cli(*args):
    return [sys.executable, "-m", "phenoflow.cli", "data", "convert", "generic", *args]


def test_worker_that_fails_writing_leaves_nothing(tmp_path):
    """A real write failure in the worker processes (the file size limit: EFBIG) after other shards finished."""
    np.save(tmp_path / "x.npy", _img())
    rows = [{"path": "x.npy", "perturbation": "a", "key": f"k{i}", "split": "val" if i < 2 else "train"}
            for i in range(60)]
    _csv(tmp_path / "g.csv", rows)
    out = tmp_path / "out"
    # val: 1 small shard that completes; train: shards of 29 samples (about 75 KB) over the 48 KB limit.
    cmd = " ".join(_cli("--csv", str(tmp_path / "g.csv"), "--out", str(out), "--workers", "2",
                        "--samples-per-shard", "29"))
    r = subprocess.run(["bash", "-c", f"ulimit -f 48; exec {cmd}"], check=False, capture_output=True, text=True)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert _leftovers(out) == []


def test_killed_worker_leaves_nothing(tmp_path):
    csv_path = _many_rows(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("--csv", str(csv_path), "--out", str(out), "--workers", "2", "--encoding", "png",
                                 "--samples-per-shard", "200"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    killed, deadline = None, time.monotonic() + 60
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for p in out.glob(".train-*.tar.tmp*") if out.exists() else []:
            pid = int(p.name.rsplit("tmp", 1)[1])
            if pid != proc.pid:  # a worker process of the conversion this test started
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert killed is not None, "the conversion finished before a worker could be killed"
    assert proc.returncode != 0 and "BrokenProcessPool" in err, err[-2000:]
    assert _leftovers(out) == []
    with pytest.raises(DataError, match="no shard manifest"):
        load_manifest(out)
