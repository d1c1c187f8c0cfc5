"""DALI backend (fn.readers.webdataset with index files): the same decoded batches as the webdataset backend."""
import pytest
import torch

from phenoflow.data.loader import ShardLoader
from phenoflow.data.prepare import write_synthetic
from phenoflow.data.synthetic import SyntheticSpec

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module", params=["raw", "npy", "png"])
def shards(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"dali_{request.param}")
    spec = SyntheticSpec(image_size=16, channels=6 if request.param != "npy" else 3, num_perturbations=3,
                         num_experiments=2)
    write_synthetic(spec, out, {"train": 83, "val": 21}, samples_per_shard=10, encoding=request.param)
    return out


def check_same_batches(a, b, n):
    ia, ib = iter(a), iter(b)
    for _ in range(n):
        x, y = next(ia), next(ib)
        assert x["key"] == y["key"]
        assert torch.equal(x["image"].cpu(), y["image"].cpu())
        for k in ("perturbation", "experiment", "cell_type", "dose", "is_control"):
            assert torch.equal(x[k], y[k])


@pytest.mark.parametrize("kw", [{"shuffle_buffer": 7}, {"shuffle_buffer": 1, "rank": 1, "world_size": 3}],
                         ids=["window", "ranks"])
def test_same_batches_as_webdataset_backend(shards, kw):
    # 12 batches of 6 cross an epoch boundary for world_size=1 (13 batches per epoch) and several for 3.
    check_same_batches(ShardLoader(shards, "train", 6, seed=4, **kw), ShardLoader(shards, "train", 6, seed=4, backend="dali", **kw),
          16)


def test_eval_mode_exactly_once(shards):
    kw = {"shuffle": False, "drop_last": False, "infinite": False}
    dali = [k for b in ShardLoader(shards, "val", 4, backend="dali", **kw) for k in b["key"]]
    assert dali == [f"val_{i:08d}" for i in range(21)]


def test_resume(shards):
    a = ShardLoader(shards, "train", 6, seed=1, backend="dali", shuffle_buffer=9)
    it = iter(a)
    for _ in range(5):
        next(it)
    state, nxt = a.state_dict(), [next(it)["key"] for _ in range(3)]
    b = ShardLoader(shards, "train", 6, seed=1, backend="dali", shuffle_buffer=9)
    b.load_state_dict(state)
    it = iter(b)
    assert [next(it)["key"] for _ in range(3)] == nxt


@pytest.mark.gpu
def test_gpu_pipeline_gives_cuda_batches(shards):
    b = next(iter(ShardLoader(shards, "train", 6, seed=4, backend="dali")))
    ref = next(iter(ShardLoader(shards, "train", 6, seed=4)))
    assert b["image"].is_cuda and torch.equal(b["image"].cpu(), ref["image"])
