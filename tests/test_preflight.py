"""Preflight: every check of the config against its data and run folder runs before anything is written
(issue 10, item 9). Faults used to pass validation, write config.yaml and the synthetic data, then die."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from phenoflow.config import resolve
from phenoflow.data.shards import FORMAT, VERSION
from phenoflow.errors import CheckpointError, ConfigError
from phenoflow.train.preflight import preflight

TINY = ["data.image_size=16", "data.channels=3", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
        "model.patch_size=4", "data.train_images=64", "data.val_images=16", "data.samples_per_shard=64",
        "train.batch_size=16", "train.device=cpu", "train.precision=fp32"]


def cfg_of(tmp_path, *overrides):
    return resolve("demo", TINY + [f"run.out_dir={tmp_path / 'runs'}", "run.name=r", *overrides])


def write_manifest(folder, counts=None, shape=(16, 16, 3), perturbations=5):
    folder.mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": 64, "val": 16}
    m = {"format": FORMAT, "version": VERSION, "image_shape": list(shape), "channels": ["r", "g", "b"][: shape[2]],
         "encoding": "raw", "splits": {s: {"count": n, "shards": []} for s, n in counts.items()},
         "vocabs": {"perturbation": ["control"] + [f"g{i}" for i in range(1, perturbations)],
                    "experiment": ["e1", "e2"], "cell_type": ["HUVEC"]}}
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_synthetic_batch_against_train_images(tmp_path):
    preflight(cfg_of(tmp_path))
    with pytest.raises(ConfigError, match=r"train\.batch_size=128 .*data\.train_images=64"):
        preflight(cfg_of(tmp_path, "train.batch_size=128"))
    # drop_last: every rank needs one full micro batch of its own part (64 images over 8 ranks = 8 < 16)
    with pytest.raises(ConfigError, match=r"micro batch 16 per rank.*8 per rank over 8 ranks"):
        preflight(cfg_of(tmp_path, "train.batch_size=128"), world_size=8)
    preflight(cfg_of(tmp_path, "train.batch_size=32"), world_size=4)  # 16 per rank, micro batch 8
    with pytest.raises(ConfigError, match=r"not divisible by the world size 3"):
        preflight(cfg_of(tmp_path), world_size=3)
    assert not (tmp_path / "runs").exists()


def test_eval_split_must_have_images(tmp_path):
    preflight(cfg_of(tmp_path), evaluate=True)
    with pytest.raises(ConfigError, match=r"eval\.split='val' has no images"):
        preflight(cfg_of(tmp_path, "data.val_images=0"), evaluate=True)
    with pytest.raises(ConfigError, match=r"eval\.split='test'"):
        preflight(cfg_of(tmp_path, "eval.split=test"), evaluate=True)


def test_shards_manifest_against_config(tmp_path):
    shards = write_manifest(tmp_path / "shards")
    src = ["data.source=shards", f"data.shards={shards}"]
    preflight(cfg_of(tmp_path, *src))
    cases = [
        (["data.image_size=32"], r"data\.image_size=32 but the shards in .* hold 16x16"),
        (["data.channels=6"], r"data\.channels=6 but the shards .* hold 3-channel"),
        (["model.num_perturbations=3"], r"model\.num_perturbations=3 is smaller than the perturbation vocabulary.*\(5\)"),
        (["train.batch_size=128"], r"train\.batch_size=128 .*train split of data\.shards=.*\(64 images"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            preflight(cfg_of(tmp_path, *src, *extra))
    with pytest.raises(ConfigError, match=r"data\.shards=.*no shard manifest"):
        preflight(cfg_of(tmp_path, "data.source=shards", f"data.shards={tmp_path / 'nowhere'}"))
    write_manifest(tmp_path / "noval", counts={"val": 16})
    with pytest.raises(ConfigError, match=r"no train split"):
        preflight(cfg_of(tmp_path, "data.source=shards", f"data.shards={tmp_path / 'noval'}"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"data\.shards=.*manifest\.json"):
        preflight(cfg_of(tmp_path, "data.source=shards", f"data.shards={tmp_path / 'broken'}"))


def test_unreadable_checkpoint_to_resume_is_named(tmp_path):
    cfg = cfg_of(tmp_path)
    ckpt = cfg.run_dir / "checkpoints" / "latest.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{ckpt} is empty"):
        preflight(cfg)
    ckpt.write_bytes(b"PK\x03\x04 a torch zip cut short")
    with pytest.raises(CheckpointError, match=f"{ckpt} .*truncated"):
        preflight(cfg)


def test_trainer_runs_preflight_before_writing(tmp_path):
    from phenoflow.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"train\.batch_size=128"):
        Trainer(cfg_of(tmp_path, "train.batch_size=128"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, needle", [
    (["train.batch_size=128"], "train.batch_size=128"),  # larger than the 64 synthetic train images
    (["data.image_size=1000000"], "data.image_size=1000000"),
    (["model.num_heads=7", "model.hidden_size=0"], "model.num_heads=7"),  # tiny: width 128 over 7 heads
])
def test_cli_faults_leave_nothing_written(tmp_path, override, needle):
    r = subprocess.run([sys.executable, "-m", "phenoflow.cli", "train", "--preset", "demo", *TINY, *override,
                        f"run.out_dir={tmp_path / 'runs'}", "run.name=r"],
                       capture_output=True, text=True, check=False, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "r").exists() and not (tmp_path / "runs").exists()


def test_eval_commands_check_their_split_first(tmp_path):
    from phenoflow.train.preflight import preflight_eval

    preflight_eval(cfg_of(tmp_path))
    with pytest.raises(ConfigError, match=r"eval\.split='seen' has no images in the synthetic data"):
        preflight_eval(cfg_of(tmp_path), ["val", "seen"])
    shards = write_manifest(tmp_path / "shards", counts={"train": 64, "test": 8})
    preflight_eval(cfg_of(tmp_path, "eval.split=test"), data_dir=shards)
    with pytest.raises(ConfigError, match=r"eval\.split='val' has no images in the shards in"):
        preflight_eval(cfg_of(tmp_path), data_dir=shards)
    r = subprocess.run([sys.executable, "-m", "phenoflow.cli", "sample", "--preset", "demo", *TINY, "eval.split=test",
                        f"run.out_dir={tmp_path / 'runs'}", "run.name=r"],
                       capture_output=True, text=True, check=False, timeout=180)
    assert r.returncode == 2 and "eval.split='test'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
