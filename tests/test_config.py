"""Config: presets, YAML round trip, dotted overrides, and bad values failing with the field's name."""
import subprocess
import sys

import pytest

from phenoflow.config import (
    PRESETS,
    ConfigError,
    dump_yaml,
    load_yaml,
    parse_overrides,
    resolve,
)


def test_every_preset_validates():
    for name in PRESETS:
        cfg = resolve(name)
        assert cfg.run.name


def test_overrides_are_typed():
    cfg = resolve("demo", ["train.batch_size=32", "eval.guidance=[1, 2.5]", "data.hflip=false", "train.lr=3e-4"])
    assert cfg.train.batch_size == 32 and cfg.eval.guidance == [1.0, 2.5]
    assert cfg.data.hflip is False and cfg.train.lr == pytest.approx(3e-4)


def test_yaml_round_trip(tmp_path):
    cfg = resolve("mit-xl2-pretrain", ["train.seed=7"])
    dump_yaml(cfg, tmp_path / "c.yaml")
    back = load_yaml(tmp_path / "c.yaml")
    assert back == cfg


@pytest.mark.parametrize("override, field", [
    (["train.batch_size=-4"], "train.batch_size"),
    (["train.batch_sise=4"], "train.batch_sise"),
    (["trian.batch_size=4"], "trian"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["train.batch_size=2.5"], "train.batch_size"),
    (["model.label_dropout=1.5"], "model.label_dropout"),
    (["flow.path=curvy"], "flow.path"),
    (["eval.ema_std=0.2"], "eval.ema_std"),
    (["data.channels=4"], "data.channels"),
    (["model.patch_size=3"], "model.patch_size"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve("demo", override)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve("nope")


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["train.batch_size"])


def test_yaml_unknown_field_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.learning_rate"):
        load_yaml(p)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "phenoflow.cli", *args], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=120)


def test_cli_dry_run_prints_config_and_stops(tmp_path):
    r = run_cli("train", "--preset", "demo", "train.batch_size=32", f"run.out_dir={tmp_path}", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "batch_size: 32" in r.stdout
    assert not any(tmp_path.iterdir()), "a dry run must not create the run folder"


@pytest.mark.parametrize("args, needle", [
    (["--preset", "nope"], "unknown preset"),
    (["train.batch_size=-1"], "train.batch_size"),
    (["train.nonsense=1"], "train.nonsense"),
])
def test_cli_bad_config_fails_before_work(tmp_path, args, needle):
    r = run_cli("train", *args, f"run.out_dir={tmp_path}")
    assert r.returncode == 2
    assert needle in r.stderr
    assert not any(tmp_path.iterdir())
