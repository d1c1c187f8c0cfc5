"""Exactly-once distribution over ranks and workers (property test) and the uneven-last-part policy."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phenoflow.data.loader import ShardLoader, batches_per_epoch, epoch_order
from phenoflow.data.prepare import write_synthetic
from phenoflow.data.synthetic import SyntheticSpec

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def _rank_batches(counts, seed, epoch, rank, world, batch, window, shuffle, drop_last):
    order = epoch_order(counts, seed, epoch, rank, world, shuffle, window)
    n = batches_per_epoch(sum(counts), batch, rank, world, drop_last)
    return [order[b * batch:(b + 1) * batch].tolist() for b in range(n)]


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda c: sum(c) > 0),
       world=st.integers(1, 8), workers=st.integers(0, 4), batch=st.integers(1, 9), window=st.integers(1, 25),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5), shuffle=st.booleans())
def test_every_sample_exactly_once(counts, world, workers, batch, window, seed, epoch, shuffle):
    n = sum(counts)
    seen = []
    for rank in range(world):
        batches = _rank_batches(counts, seed, epoch, rank, world, batch, window, shuffle, drop_last=False)
        # DataLoader workers take batch ids round-robin (batch b -> worker b % workers) and return them in
        # order; each worker computes its batches from (epoch, b) alone, so the union is the rank's sequence.
        per_worker = [[b for b in range(len(batches)) if b % max(workers, 1) == w] for w in range(max(workers, 1))]
        assert sorted(b for ids in per_worker for b in ids) == list(range(len(batches)))
        seen += [g for b in batches for g in b]
    assert sorted(seen) == list(range(n))  # every sample once over all ranks
    # Uneven last part: parts differ by at most one sample.
    sizes = [len(epoch_order(counts, seed, epoch, r, world, shuffle, window)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda c: sum(c) > 0),
       world=st.integers(1, 8), batch=st.integers(1, 9), window=st.integers(1, 25), seed=st.integers(0, 2**31))
def test_drop_last_policy_equal_batch_counts_no_repeat(counts, world, batch, window, seed):
    n = sum(counts)
    per_rank = [_rank_batches(counts, seed, 0, r, world, batch, window, True, drop_last=True) for r in range(world)]
    assert {len(b) for b in per_rank} == {(n // world) // batch}  # lock-step ranks
    ids = [g for bs in per_rank for b in bs for g in b]
    assert len(ids) == len(set(ids)) and all(len(b) == batch for bs in per_rank for b in bs)
    assert n - len(ids) < world * batch + world  # what is left out of this epoch is bounded


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("once")
    write_synthetic(SyntheticSpec(image_size=16, num_perturbations=2, num_experiments=1), out, {"train": 53},
                    samples_per_shard=6)
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 4), (3, 1), (5, 3), (8, 2)])
def test_real_loader_exactly_once_with_workers(shards, world, workers):
    keys = []
    for rank in range(world):
        loader = ShardLoader(shards, "train", 4, rank=rank, world_size=world, num_workers=workers, seed=7,
                             shuffle=True, drop_last=False, infinite=False, shuffle_buffer=5)
        got = [k for b in loader for k in b["key"]]
        ref = ShardLoader(shards, "train", 4, rank=rank, world_size=world, seed=7, shuffle=True, drop_last=False,
                          infinite=False, shuffle_buffer=5)
        assert got == [k for b in ref for k in b["key"]]  # workers do not change the order
        keys += got
    assert sorted(keys) == [f"train_{i:08d}" for i in range(53)]
    assert len(np.unique(keys)) == 53


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=10), seed=st.integers(0, 1000), data=st.data())
def test_stream_slice_matches_the_concatenated_stream(counts, seed, data):
    from phenoflow.data.loader import shard_order, stream_slice

    n = sum(counts)
    perm = shard_order(len(counts), seed, 0, True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    full = [s + j for p in perm for s in [starts[p]] for j in range(counts[p])]
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    assert stream_slice(counts, perm, lo, hi).tolist() == full[lo:hi]
