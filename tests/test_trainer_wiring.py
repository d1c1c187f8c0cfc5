"""Config fields reach the parts they govern through the one trainer: data.checksums (the loader's crc32
policy) and train.weight_guard (the engines' post-step finiteness check), and a consolidated checkpoint that
is not ours is a CheckpointError naming the file (exit code 2 in the CLI), not a bare RuntimeError."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_worker as TW

from phenoflow.config import resolve
from phenoflow.data.errors import ChecksumError
from phenoflow.data.prepare import write_synthetic
from phenoflow.data.shards import load_manifest, read_index
from phenoflow.data.synthetic import SyntheticSpec
from phenoflow.errors import CheckpointError, NonFiniteError


def _damaged_shards(folder: Path) -> Path:
    """64 synthetic 16x16x3 crops in 2 shards, one payload byte of the first sample flipped."""
    spec = SyntheticSpec(image_size=16, channels=3, num_perturbations=3, num_experiments=2)
    write_synthetic(spec, folder, {"train": 64, "val": 16}, samples_per_shard=32)
    rec = load_manifest(folder)["splits"]["train"]["shards"][0]
    off, size = read_index(folder / rec["index"])[0]["img"]
    with open(folder / rec["name"], "r+b") as f:
        f.seek(off + size // 2)
        b = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([b[0] ^ 0x5A]))
    return folder


def _shard_cfg(tmp_path, folder, name, checksums):
    return resolve("demo", TW.TINY + ["data.source=shards", f"data.shards={folder}", "data.train_images=64",
                                      f"data.checksums={checksums}", "train.total_samples=64",
                                      f"run.out_dir={tmp_path}", f"run.name={name}"])


def test_data_checksums_reaches_the_training_loader(tmp_path):
    folder = _damaged_shards(tmp_path / "shards")
    with pytest.raises(ChecksumError, match=r"train-.*\.tar"):
        TW.trainer(_shard_cfg(tmp_path, folder, "checked", "always")).fit()
    TW.trainer(_shard_cfg(tmp_path, folder, "unchecked", "off")).fit()  # the user's explicit choice: trains
    assert (tmp_path / "unchecked" / "export" / "model.safetensors").is_file()


def test_weight_guard_off_leaves_the_old_behaviour(tmp_path):
    cfg = resolve("demo", TW.TINY + ["train.total_samples=128", "train.max_nonfinite_steps=2",
                                     "train.weight_guard=false", f"run.out_dir={tmp_path}", "run.name=noguard"])
    tr = TW.AbsurdLR(cfg)
    assert tr.engine.guard_weights is False
    tr.bad_at = 48
    # Without the guard the step at lr = inf goes through; the next losses are NaN and the run stops only after
    # max_nonfinite_steps skipped steps, with non-finite weights (what the guard, on by default, prevents).
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        tr.fit()
    assert not all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert TW.trainer(resolve("demo", TW.TINY + [f"run.out_dir={tmp_path}", "run.name=guard"])).engine.guard_weights


def test_foreign_consolidated_checkpoint_is_a_checkpoint_error(tmp_path):
    cfg = resolve("demo", TW.TINY + ["train.total_samples=32", f"run.out_dir={tmp_path}", "run.name=foreign"])
    ckpt = cfg.run_dir / "checkpoints" / "latest.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": "something-else", "model": {}}, ckpt)
    with pytest.raises(CheckpointError, match=r"latest\.pt: not a consolidated phenoflow checkpoint"):
        TW.trainer(cfg).fit()
