"""The expression loader's batch decode (expression_loader.decode_batch) equals decoding member by member
(expression_shards.decode_csr), and refuses every malformed member so that the per-sample path can name it."""
from __future__ import annotations

import numpy as np
import pytest

from phenoflow.data.expression_loader import decode_batch
from phenoflow.data.expression_shards import decode_csr


def member(idx, val) -> bytes:
    idx, val = np.asarray(idx, "<i4"), np.asarray(val, "<f4")
    return np.int32(len(idx)).astype("<i4").tobytes() + idx.tobytes() + val.tobytes()


def random_members(rng, n, genes):
    out = []
    for _ in range(n):
        k = int(rng.integers(0, genes // 2))  # empty members included
        idx = np.sort(rng.choice(genes, k, replace=False))
        out.append(member(idx, rng.random(k) * 5))
    return out


def test_batch_decode_equals_member_by_member():
    rng = np.random.default_rng(0)
    bufs = random_members(rng, 37, 101)
    fast = np.zeros((40, 101), np.float32)
    assert decode_batch(bufs, 101, fast)
    slow = np.zeros((40, 101), np.float32)
    for i, b in enumerate(bufs):
        idx, val = decode_csr(b, 101)
        slow[i, idx] = val
    np.testing.assert_array_equal(fast, slow)
    assert decode_batch([member([], [])], 5, np.zeros((1, 5), np.float32))


@pytest.mark.parametrize("bad", [
    member([3, 1], [1.0, 2.0]),            # not increasing
    member([1, 1], [1.0, 2.0]),            # repeated position
    member([0, 7], [1.0, 2.0]),            # outside [0, 5)
    member([-1, 2], [1.0, 2.0]),           # negative
    member([0, 2], [1.0, np.nan]),         # non-finite
    member([0, 2], [1.0, 2.0])[:-4],       # truncated
    np.int32(3).tobytes() + member([0, 2], [1.0, 2.0])[4:],  # header says 3, size says 2
    b"\x01\x00",                           # shorter than the header
])
def test_malformed_member_is_refused_and_x_untouched(bad):
    good = member([0, 4], [1.0, 2.0])
    x = np.zeros((3, 5), np.float32)
    assert not decode_batch([good, bad, good], 5, x)
    assert not x.any()
    with pytest.raises(ValueError):
        decode_csr(bad, 5)
