"""ShardLoader: determinism, worker invariance, exact mid-epoch resume, exactly-once evaluation, rank policy."""
import pytest
import torch

from phenoflow.data.loader import ShardLoader, epoch_order
from phenoflow.data.prepare import write_synthetic
from phenoflow.data.synthetic import SyntheticSpec

N_TRAIN, N_VAL = 203, 37


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    spec = SyntheticSpec(image_size=16, channels=6, num_perturbations=4, num_experiments=2)
    write_synthetic(spec, out, {"train": N_TRAIN, "val": N_VAL}, samples_per_shard=20)
    return out


def _keys(loader, n):
    it = iter(loader)
    return [next(it)["key"] for _ in range(n)]


def test_batch_format(shards):
    b = next(iter(ShardLoader(shards, "train", 8)))
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (8, 6, 16, 16)
    for g in ("perturbation", "experiment", "cell_type"):
        assert b[g].dtype == torch.int64 and b[g].shape == (8,)
    assert b["dose"].dtype == torch.float32 and b["is_control"].dtype == torch.bool and len(b["key"]) == 8
    v = ShardLoader(shards, "train", 8).vocabs["perturbation"]
    assert all(b["is_control"] == (b["perturbation"] == v.index("control")))


def test_deterministic_from_seed_and_epoch(shards):
    a = _keys(ShardLoader(shards, "train", 16, seed=5), 30)  # crosses two epoch boundaries (12 batches each)
    assert a == _keys(ShardLoader(shards, "train", 16, seed=5), 30)
    assert a != _keys(ShardLoader(shards, "train", 16, seed=6), 30)
    assert a[:12] != a[12:24]  # each epoch reshuffled
    epoch0 = [k for b in a[:12] for k in b]
    assert len(set(epoch0)) == 12 * 16  # no repeat within an epoch


def test_workers_do_not_change_order(shards):
    ref = _keys(ShardLoader(shards, "train", 16, seed=2), 14)
    assert _keys(ShardLoader(shards, "train", 16, seed=2, num_workers=2), 14) == ref


@pytest.mark.parametrize("stop", [3, 11, 12, 17])
def test_resume_continues_exactly(shards, stop):
    full = _keys(ShardLoader(shards, "train", 16, seed=9), 26)
    first = ShardLoader(shards, "train", 16, seed=9)
    it = iter(first)
    head = [next(it)["key"] for _ in range(stop)]
    state = first.state_dict()
    resumed = ShardLoader(shards, "train", 16, seed=9)
    resumed.load_state_dict(state)
    tail = _keys(resumed, 26 - stop)
    assert head + tail == full  # no repeat, no gap, epoch boundaries included


def test_resume_state_mismatch_is_an_error(shards):
    state = ShardLoader(shards, "train", 16, seed=9).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(shards, "train", 16, seed=1).load_state_dict(state)


def test_eval_mode_exactly_once_in_manifest_order(shards):
    loader = ShardLoader(shards, "val", 10, shuffle=False, drop_last=False, infinite=False)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [10, 10, 10, 7]
    assert [k for b in batches for k in b["key"]] == [f"val_{i:08d}" for i in range(N_VAL)]
    assert [k for b in loader for k in b["key"]] == [f"val_{i:08d}" for i in range(N_VAL)]  # next pass: again


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_partition_the_split(shards, world):
    keys = []
    for r in range(world):
        loader = ShardLoader(shards, "train", 7, rank=r, world_size=world, shuffle=True, drop_last=False,
                             infinite=False, seed=4, shuffle_buffer=13)
        keys += [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"train_{i:08d}" for i in range(N_TRAIN)]
    # drop_last: every rank yields the same number of full batches.
    n = {len(ShardLoader(shards, "train", 7, rank=r, world_size=world)) for r in range(world)}
    assert n == {(N_TRAIN // world) // 7}


def test_epoch_order_is_a_permutation_with_local_windows():
    counts = [5, 9, 1, 7]
    o = epoch_order(counts, seed=0, epoch=3, window=4)
    assert sorted(o.tolist()) == list(range(22))
    stream = epoch_order(counts, seed=0, epoch=3, window=1)  # shard shuffle only
    assert o.tolist() != stream.tolist()
    for w in range(0, 22, 4):  # each window of 4 is a permutation of the same window of the stream
        assert sorted(o[w:w + 4].tolist()) == sorted(stream[w:w + 4].tolist())
    assert epoch_order(counts, 0, 0, shuffle=False).tolist() == list(range(22))


def test_channels_last_view_has_the_same_values(shards):
    ref = _keys(ShardLoader(shards, "train", 16, seed=2), 1)
    a = next(iter(ShardLoader(shards, "train", 16, seed=2)))
    b = next(iter(ShardLoader(shards, "train", 16, seed=2, channels_last=True, num_workers=1)))
    assert b["key"] == ref[0] and b["image"].shape == a["image"].shape
    assert b["image"].is_contiguous(memory_format=torch.channels_last) and torch.equal(a["image"], b["image"])


def test_prepare_data_writes_once_and_reuses(tmp_path):
    from phenoflow.config import resolve
    from phenoflow.data.prepare import prepare_data
    from phenoflow.data.shards import load_manifest

    cfg = resolve("demo", [f"run.out_dir={tmp_path}", "data.train_images=64", "data.val_images=16",
                           "data.image_size=16", "data.samples_per_shard=32"])
    out = prepare_data(cfg, workers=1)
    assert out == cfg.run_dir / "data" and load_manifest(out)["splits"]["train"]["count"] == 64
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_data(cfg, workers=1) == out and (out / "manifest.json").stat().st_mtime_ns == mtime
    cfg.data.val_images = 8  # a different spec: rewritten
    prepare_data(cfg, workers=1)
    assert load_manifest(out)["splits"]["val"]["count"] == 8 and len(list(out.glob("val-*.tar"))) == 1
    b = next(iter(ShardLoader(out, "val", 8, shuffle=False, drop_last=False, infinite=False)))
    assert b["image"].shape == (8, 6, 16, 16)


def _same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for k in ("image", "perturbation", "experiment", "cell_type", "dose", "is_control"):
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("channels_last", [False, True])
def test_worker_ring_batches_equal_in_process_batches_even_when_all_are_held(shards, channels_last):
    """Workers hand batches over through reused shared-memory slots. Holding every batch of two epochs (far more
    than the slots) must not let a slot be overwritten while referenced: each held batch stays equal to the one
    the main process reads itself."""
    def run(workers):
        return list(ShardLoader(shards, "train", 16, seed=4, num_workers=workers, infinite=False,
                                channels_last=channels_last))

    ref = run(0)
    held = run(2) + run(2)  # 24 batches held at once
    _same_batches(ref + ref, held)
    assert held[0]["image"].is_contiguous(memory_format=torch.channels_last if channels_last
                                          else torch.contiguous_format)


@pytest.mark.parametrize("workers", [0, 1])
def test_ring_reuses_slots_when_batches_are_dropped(shards, workers):
    """Consumed one at a time (as the trainer does), batches come from the ring: the slots are released when the
    batch is dropped and reused, and the values equal those of batches that were all held (fresh buffers)."""
    from phenoflow.data.loader import BatchRing

    ref = list(ShardLoader(shards, "train", 16, seed=4, num_workers=2, infinite=False, channels_last=True))
    loader = ShardLoader(shards, "train", 16, seed=4, num_workers=workers, infinite=False, channels_last=True)
    seen = []
    for b, r in zip(loader, ref):
        _same_batches([r], [b])
        seen.append(b["image"].untyped_storage().data_ptr())
        del b
    slots = 3 if workers == 0 else loader.prefetch_factor + 3
    assert len(set(seen)) <= slots < len(seen)  # slot addresses repeat: reused

    ring = BatchRing(1, 2, (4, 2, 2, 1))
    assert ring.acquire(0) == 0 and ring.acquire(0) == 1 and ring.acquire(0) is None  # both taken
    t = ring.tensor(0, 1, 3)
    view = t.view(3, 2, 2, 1).permute(0, 3, 1, 2)
    del t
    assert ring.acquire(0) is None  # a view still uses slot 1
    del view
    assert ring.acquire(0) == 1  # released with the last view


def test_finite_loader_keeps_its_workers_between_full_passes_only(shards):
    """A finite loader's next pass reuses the workers of a pass that ran to its end (their shard caches survive),
    and gives the same batches as a loader read in process; a pass abandoned early keeps nothing, so the next
    pass starts fresh workers and still resumes at the right batch."""
    ref = ShardLoader(shards, "train", 16, seed=4, infinite=False)
    ref_epochs = [[b["key"] for b in ref] for _ in range(3)]
    loader = ShardLoader(shards, "train", 16, seed=4, num_workers=2, infinite=False)
    first = [b["key"] for b in loader]
    kept = loader._kept
    assert kept is not None and kept[0]._iterator is not None  # persistent workers, alive
    second = [b["key"] for b in loader]
    assert loader._kept is not None and loader._kept[0] is kept[0]  # the same DataLoader served pass two
    assert [first, second] == ref_epochs[:2]
    it = iter(loader)
    partial = [next(it)["key"], next(it)["key"]]
    it.close()  # abandoned: nothing kept
    assert loader._kept is None
    rest = [b["key"] for b in loader]  # resumes at batch 2 of epoch 2 with fresh workers
    assert partial + rest == ref_epochs[2]
