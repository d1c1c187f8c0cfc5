"""`phenoflow data plan` arithmetic and the `data` CLI subcommands."""
import argparse

import pytest

from phenoflow.data import commands
from phenoflow.data.plan import bytes_per_sample, format_plan, plan
from phenoflow.data.shards import load_manifest


def _run(argv):
    parser = argparse.ArgumentParser(prog="phenoflow")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_for_a_stated_size():
    p = plan(images=12_000_000, shape="96x96x6", encoding="raw", gpus=32, images_per_s_per_gpu=21.0)
    per = 512 + 512 + 512 + 96 * 96 * 6  # json member (header + one block) + image member (exact blocks)
    assert p["bytes_per_sample"] == per == bytes_per_sample((96, 96, 6), "raw")
    assert p["total_bytes"] == per * 12_000_000
    assert p["read_bytes_per_s_per_gpu"] == pytest.approx(21 * per)
    assert p["epoch_seconds"] == pytest.approx(12_000_000 / (21 * 32))
    assert p["shards"] * p["samples_per_shard"] >= 12_000_000 and 0.9e9 < p["shard_bytes"] < 1.2e9
    assert "epoch time" in format_plan(p)
    with pytest.raises(ValueError, match="HxWxC"):
        plan(shape="96x96")


def test_cli_synth_then_plan_from_manifest(tmp_path, capsys):
    assert _run(["data", "synth", "--out", str(tmp_path / "d"), "--preset", "demo", "data.train_images=40",
                 "data.val_images=8", "data.image_size=16", "data.samples_per_shard=16"]) == 0
    m = load_manifest(tmp_path / "d")
    assert m["splits"]["train"]["count"] == 40 and len(m["splits"]["train"]["shards"]) == 3
    assert m["image_shape"] == [16, 16, 6]
    assert _run(["data", "plan", "--manifest", str(tmp_path / "d"), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "48 images of 16x16x6" in out
    assert _run(["data", "verify", str(tmp_path / "d")]) == 0
    assert "train: 40 samples" in capsys.readouterr().out
    p = plan(tmp_path / "d", gpus=2)
    shard_bytes = sum(r["bytes"] for s in m["splits"].values() for r in s["shards"])
    assert p["total_bytes"] == shard_bytes and p["shards"] == 4


def test_prepare_checks_an_existing_shard_folder(tmp_path):
    from phenoflow.config import ConfigError, resolve
    from phenoflow.data.prepare import prepare_data

    _run(["data", "synth", "--out", str(tmp_path / "d"), "data.train_images=8", "data.val_images=0",
          "data.image_size=16"])
    base = ["data.source=shards", f"data.shards={tmp_path / 'd'}", f"run.out_dir={tmp_path}"]
    assert prepare_data(resolve("demo", base + ["data.image_size=16"])) == tmp_path / "d"
    with pytest.raises(ConfigError, match="data.image_size=32 but the shards"):
        prepare_data(resolve("demo", base + ["data.image_size=32"]))
    with pytest.raises(ConfigError, match="data.channels=3"):
        prepare_data(resolve("demo", base + ["data.image_size=16", "data.channels=3"]))
    with pytest.raises(ConfigError, match="no shard manifest"):
        prepare_data(resolve("demo", ["data.source=shards", f"data.shards={tmp_path / 'nothing'}"]))
