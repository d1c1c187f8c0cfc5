"""User-facing failures end in one message naming the file, field or value and an exit code (2; 3 for a
non-finite stop), never an uncaught traceback; `--debug` shows the traceback (issue 10, items 9 and 10)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from phenoflow.config import resolve, to_dict
from phenoflow.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    PhenoflowError,
)
from phenoflow.model.mit import build_model
from phenoflow.train.checkpoint import (
    check_checkpoint_file,
    ema_filename,
    load_checkpoint,
    load_safetensors,
    load_weights,
    save_checkpoint,
    save_safetensors,
)

TINY = ["data.image_size=16", "data.channels=3", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
        "model.patch_size=4", "data.train_images=64", "data.val_images=16", "data.samples_per_shard=64",
        "train.batch_size=16", "train.device=cpu", "train.precision=fp32", "train.log_every_samples=160",
        "train.ckpt_every_samples=160"]
VOCAB = {"perturbation": 5, "experiment": 2, "cell_type": 1}


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "phenoflow.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=timeout)


def check_clean_failure(r, code: int, *needles: str) -> None:
    """Exit `code`, no traceback, one message on stderr naming each needle."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


# ---- the error family -------------------------------------------------------------------------------------
def test_error_family_and_exit_codes():
    assert issubclass(ConfigError, PhenoflowError) and issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, PhenoflowError) and issubclass(NonFiniteError, PhenoflowError)
    assert ConfigError.exit_code == CheckpointError.exit_code == 2 and NonFiniteError.exit_code == 3
    from phenoflow.cli import exit_code_for

    assert exit_code_for(ConfigError("x")) == 2 and exit_code_for(NonFiniteError("x")) == 3
    assert exit_code_for(FileNotFoundError(2, "No such file", "/x")) == 2
    assert exit_code_for(KeyError("a bug")) is None  # bugs keep their traceback


def test_command_modules_do_not_import_the_console_script():
    """train/commands.py and eval/commands.py used to import phenoflow.cli back (an import circle)."""
    code = ("import sys; import phenoflow.train.commands, phenoflow.eval.commands, phenoflow.data.commands; "
            "assert 'phenoflow.cli' not in sys.modules, 'circle'; import phenoflow.cli; phenoflow.cli.build_parser()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- config faults through the CLI ------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["train.lr=.inf"], ["train.lr=inf", "finite"]),
    (["run.name=.."], ["run.name='..'"]),
    (["model.num_heads=7"], ["model.num_heads=7"]),
])
def test_cli_config_faults_exit_2_without_traceback(tmp_path, args, needles):
    r = run_cli("train", "--preset", "demo", *args, f"run.out_dir={tmp_path / 'runs'}")
    check_clean_failure(r, 2, *needles)
    assert not (tmp_path / "runs").exists() and not any(tmp_path.iterdir())


def test_cli_config_file_faults(tmp_path):
    (tmp_path / "dup.yaml").write_text("train:\n  lr: 0.001\n  batch_size: 8\n  lr: 0.1\n")
    (tmp_path / "bin.yaml").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00garbage\xff\xfe")
    (tmp_path / "folder.yaml").mkdir()
    cases = {"dup.yaml": ["duplicate key 'lr' on line 4"], "bin.yaml": ["binary"],
             "folder.yaml": ["is a directory"], "missing.yaml": ["no such file"]}
    for name, needles in cases.items():
        r = run_cli("train", "--config", tmp_path / name, f"run.out_dir={tmp_path / 'runs'}")
        check_clean_failure(r, 2, str(tmp_path / name), *needles)
    assert not (tmp_path / "runs").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    for args in (["--debug", "train", "run.name=.."], ["train", "--debug", "run.name=.."]):
        r = run_cli(*args, f"run.out_dir={tmp_path}")
        assert r.returncode == 2
        assert "Traceback" in r.stderr and "ConfigError" in r.stderr and "run.name='..'" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_empty_and_truncated_checkpoint_files_name_the_file(tmp_path):
    empty = tmp_path / "latest.pt"
    empty.write_bytes(b"")
    for fn in (load_checkpoint, check_checkpoint_file):
        with pytest.raises(CheckpointError, match=f"{empty}.* is empty"):
            fn(empty)
    good = save_checkpoint({"w": torch.ones(1000), "n": 3}, tmp_path / "good.pt")
    check_checkpoint_file(good)
    assert load_checkpoint(good)["n"] == 3
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for fn in (load_checkpoint, check_checkpoint_file):
        with pytest.raises(CheckpointError, match=f"{cut}.*truncated"):
            fn(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "foreign.pt", "w") as z:
        z.writestr("readme.txt", "a zip, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"foreign\.pt is a zip archive but not a torch checkpoint"):
        check_checkpoint_file(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_cli_resume_from_empty_latest_pt(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    r = run_cli("train", "--preset", "demo", *TINY, f"run.out_dir={tmp_path}", "run.name=run")
    check_clean_failure(r, 2, str(ckpt), "is empty (0 bytes)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"], "nothing written before the check"


def _export(tmp_path, state: dict[str, torch.Tensor] | None = None, raw: bytes | None = None):
    """A run folder with export/model.json for the TINY config and its EMA weights file (state, or raw bytes)."""
    cfg = resolve("demo", TINY + [f"run.out_dir={tmp_path}", "run.name=run"])
    export = cfg.run_dir / "export"
    export.mkdir(parents=True)
    (export / "model.json").write_text(json.dumps({"config": to_dict(cfg), "vocab_sizes": VOCAB}))
    wfile = export / ema_filename(cfg.eval.ema_std)
    if raw is not None:
        wfile.write_bytes(raw)
    else:
        save_safetensors(state, wfile)
    return cfg, wfile


def _tiny_state(hidden: int = 32) -> dict[str, torch.Tensor]:
    cfg = resolve("demo", TINY + [f"model.hidden_size={hidden}"])
    return build_model(cfg, VOCAB).state_dict()


def test_safetensors_truncated_or_foreign_names_the_file(tmp_path):
    path = save_safetensors(_tiny_state(), tmp_path / "w.safetensors")
    assert set(load_safetensors(path)) == set(_tiny_state())
    data = path.read_bytes()
    for name, raw in {"cut": data[: len(data) // 2], "head": data[:5], "text": b"not safetensors at all\n",
                      "empty": b""}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(raw)
        with pytest.raises(CheckpointError, match=str(bad)):
            load_safetensors(bad)


def test_wrong_shape_weights_name_file_tensor_and_shapes(tmp_path):
    model = build_model(resolve("demo", TINY), VOCAB)
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*wrong shape") as e:
        load_weights(model, _tiny_state(hidden=64), tmp_path / "w.safetensors")
    assert "file (64," in str(e.value) and "model (32," in str(e.value)


def test_cli_truncated_and_wrong_shape_safetensors(tmp_path):
    good = save_safetensors(_tiny_state(), tmp_path / "good.safetensors").read_bytes()
    cfg, wfile = _export(tmp_path / "cut", raw=good[: len(good) // 3])
    r = run_cli("sample", "--preset", "demo", *TINY, "--run-dir", cfg.run_dir)
    check_clean_failure(r, 2, str(wfile), "truncated")
    cfg, wfile = _export(tmp_path / "shape", state=_tiny_state(hidden=64))
    r = run_cli("sample", "--preset", "demo", *TINY, "--run-dir", cfg.run_dir)
    check_clean_failure(r, 2, str(wfile), "wrong shape", "file (64,", "model (32,")
    assert not (cfg.run_dir / "data").exists() and not (cfg.run_dir / "samples").exists()


# ---- a non-finite stop ------------------------------------------------------------------------------------
def test_cli_nonfinite_stop_has_its_own_exit_code(tmp_path):
    """An absurd but finite learning rate: the first step overflows the weights and the guard stops the run."""
    r = run_cli("train", "--preset", "demo", *TINY, "train.lr=1e30", "train.max_nonfinite_steps=1",
                "train.total_samples=320", f"run.out_dir={tmp_path}", "run.name=nf")
    check_clean_failure(r, 3, "non-finite", "nonfinite-diagnostic.pt")
