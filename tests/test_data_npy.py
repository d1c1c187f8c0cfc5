"""The strict .npy reader used for image payloads: equal to np.load on every layout numpy writes for uint8,
a ValueError for anything else, and no `ast` on the way (CPython 3.11's AST recursion counter can fail
spuriously under threads, python/cpython#106905, which would drop intact samples under the skip policy)."""
import ast
import io

import numpy as np
import pytest

from phenoflow.data.npy import read_uint8_npy
from phenoflow.data.shards import decode_image


def _npy(arr, version=None):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(5, 7, 3), (16, 16, 6), (1, 1, 1), (13,), (3, 11)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
def test_equals_np_load(shape, order, version):
    a = np.asfortranarray if order == "F" else np.ascontiguousarray
    arr = a(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    data = _npy(arr, version)
    ref = np.load(io.BytesIO(data), allow_pickle=False)
    got = read_uint8_npy(data)
    assert got.dtype == np.uint8 and got.shape == ref.shape and np.array_equal(got, ref)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-1], "data has 47 bytes"),
    (lambda d: d + b"x", "data has 49 bytes"),
    (lambda d: d[:20], "runs past the payload"),
    (lambda d: b"junk" * 10, "no .x93NUMPY magic"),
    (lambda d: d[:6] + b"\x09\x00" + d[8:], "version 9.0"),
    (lambda d: d.replace(b"'shape'", b"'shapf'"), "does not describe a uint8 array"),
])
def test_damage_is_a_value_error(damage, message):
    data = _npy(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=message):
        read_uint8_npy(damage(data))


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, bool])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match=f"image has dtype {np.dtype(dtype)}, expected uint8"):
        read_uint8_npy(_npy(np.zeros((2, 2), dtype)))


def test_decode_image_does_not_parse_with_ast(monkeypatch):
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 6), dtype=np.uint8)
    data = _npy(img)

    def broken(*a, **k):
        raise SystemError("AST constructor recursion depth mismatch (before=195, after=216)")

    monkeypatch.setattr(ast, "literal_eval", broken)
    assert np.array_equal(decode_image(data, "npy", (8, 8, 6)), img)
