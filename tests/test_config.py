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


# ---- issue 10: run names, non-finite numbers, the model's shape, YAML files ----------------------------------
@pytest.mark.parametrize("name", ["..", ".", "a/b", "/tmp/abs", "..\\up", "-rf", "", " x", "a\tb"])
def test_run_name_must_be_one_folder_name(name):
    """'..' or a name with '/' put the run into run.out_dir's parent or elsewhere (issue 10, item 2)."""
    with pytest.raises(ConfigError, match=r"run\.name="):
        _resolve_name(name)
    if name and name == name.strip():  # (YAML strips the value of an override)
        with pytest.raises(ConfigError, match=r"run\.name="):
            resolve("demo", [f"run.name={name}"])


def _resolve_name(name):
    from phenoflow.config import validate

    cfg = resolve("demo")
    cfg.run.name = name
    return validate(cfg)


def test_run_name_ordinary_names_pass():
    for name in ("demo", "mit-xl2_rxrx1.v2", "run 3", "a..b"):
        assert _resolve_name(name).run.name == name


@pytest.mark.parametrize("override, field", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.grad_clip=.inf", "train.grad_clip"), ("flow.logit_std=.nan", "flow.logit_std"),
    ("eval.guidance=[1, .inf]", r"eval.guidance\[1\]"), ("train.ema_stds=[.nan]", r"train.ema_stds\[0\]"),
])
def test_non_finite_numbers_are_rejected(override, field):
    with pytest.raises(ConfigError, match=field + r"=.*must be a finite number"):
        resolve("demo", [override])


def test_every_float_field_must_be_finite():
    import dataclasses
    import typing

    from phenoflow.config import Config, validate

    checked = 0
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        for f in dataclasses.fields(cls):
            if typing.get_type_hints(cls)[f.name] is float:
                for bad in (float("inf"), float("-inf"), float("nan")):
                    cfg = resolve("demo")
                    setattr(getattr(cfg, section.name), f.name, bad)
                    with pytest.raises(ConfigError, match=rf"{section.name}\.{f.name}=.*finite"):
                        validate(cfg)
                checked += 1
    assert checked >= 15


@pytest.mark.parametrize("override, needle", [
    (["model.num_heads=7"], r"model\.num_heads=7 does not divide .*model\.hidden_size=128"),
    (["model.hidden_size=90", "model.num_heads=6"], r"model\.hidden_size=90 must be divisible by 4"),
    (["model.depth=3"], r"model\.depth=3 must be even"),
    (["data.image_size=1000000"], r"data\.image_size=1000000 is above the maximum of 1024"),
    (["data.image_size=1024", "model.patch_size=2"], r"data\.image_size=1024 .* 262144 tokens"),
])
def test_model_shape_is_checked_at_config_time(override, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve("demo", override)


def test_model_shape_limits_leave_real_shapes_alone():
    at_limit = resolve("demo", ["data.image_size=512", "model.patch_size=2"])  # 65,536 tokens: the limit
    assert (at_limit.data.image_size // at_limit.model.patch_size) ** 2 == 65_536
    odd_depth = resolve("demo", ["model.depth=3", "model.long_skip=false"])
    assert odd_depth.model.depth == 3 and odd_depth.model.long_skip is False
    assert resolve("demo", ["model.size=XL-h64"]).model.size == "XL-h64"


def test_one_size_table_for_validation_and_model():
    from phenoflow.config_validate import MODEL_SIZES
    from phenoflow.model.mit import MIT_SIZES

    assert MIT_SIZES is MODEL_SIZES  # one table, no copy to drift
    assert MODEL_SIZES["XL"] == (28, 1152, 16) and MODEL_SIZES["XL-h64"] == (28, 1152, 18)  # DiT-XL, 72 -> 64


def test_validation_does_not_import_torch():
    code = ("import sys; from phenoflow.config import resolve; resolve('mit-xl2-rxrx1', ['model.num_heads=18']); "
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr


def test_duplicate_yaml_keys_are_errors(tmp_path):
    cases = {
        "top.yaml": ("train:\n  lr: 0.1\nmodel:\n  size: S\ntrain:\n  seed: 1\n", "duplicate key 'train' on line 5"),
        "nested.yaml": ("train:\n  lr: 0.001\n  batch_size: 8\n  lr: 0.1\n", "duplicate key 'lr' on line 4"),
        "flow.yaml": ("eval: {guidance: [1, 2], guidance: [3]}\n", "duplicate key 'guidance'"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=f"{name}.*{needle}"):
            load_yaml(tmp_path / name)
    with pytest.raises(ConfigError, match="eval.guidance.*duplicate key 'a'"):
        parse_overrides(["eval.guidance={a: 1, a: 2}"])
    (tmp_path / "merge.yaml").write_text("train: &t\n  lr: 0.01\n  seed: 3\n")  # anchors stay legal
    assert load_yaml(tmp_path / "merge.yaml").train.seed == 3


def test_config_path_missing_directory_or_binary(tmp_path):
    (tmp_path / "nul.yaml").write_bytes(b"train:\n  lr: 0.1\x00\n")
    (tmp_path / "latin1.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbftrain:\n  seed: 5\n")
    cases = {"missing.yaml": "no such file", "": "is a directory", "nul.yaml": "a binary file",
             "latin1.yaml": "not UTF-8"}
    for name, needle in cases.items():
        path = tmp_path / name if name else tmp_path
        with pytest.raises(ConfigError, match=f"config file {path}: {needle}"):
            load_yaml(path)
    assert load_yaml(tmp_path / "bom.yaml").train.seed == 5


def test_yaml_booleans_are_only_true_and_false():
    """YAML 1.1 reads off/no/yes/on as booleans; a string field given `off` must stay the string."""
    from phenoflow.config import resolve, yaml_load

    assert resolve("demo", ["data.checksums=off"]).data.checksums == "off"
    assert resolve("demo", ["run.name=no"]).run.name == "no"
    assert resolve("demo", ["data.hflip=false"]).data.hflip is False
    assert yaml_load("a: off\nb: True\nc: FALSE\nd: yes") == {"a": "off", "b": True, "c": False, "d": "yes"}
    with pytest.raises(ConfigError, match="data.hflip='no' must be true or false"):
        resolve("demo", ["data.hflip=no"])
