"""A run as one self-contained thing: the resolved config and label vocabularies saved with a run folder or an export.

    run folder   RUN/config.yaml (the resolved config), RUN/vocab.json (label names), RUN/checkpoints/,
                 RUN/export/{model.json, manifest.json, model.safetensors, ema-<std>.safetensors}
    export       a folder holding model.json (config + vocabulary sizes), manifest.json (vocabularies) and weights

`find_run(path)` reads either. `config_for_run(ref, overrides)` is the saved config with dotted overrides on top,
the run folder as its location, and checked against what the checkpoint needs (`check_against_checkpoint`:
model shape, image size, channels, modality); a conflict is a ConfigError before any work. `label_remap` compares
the model's vocabularies with the data's BY NAME: the same names in another order or a subset are mapped to the
model's indices; a data label the model does not know is a ConfigError naming it. `check_resume(cfg)` lists the
fields a resumed training run would change, allows the harmless ones (length, intervals, evaluation, where and on
what hardware it runs) and refuses the rest before anything is written.
This module reads only; it imports torch only inside label_remap.
"""
from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phenoflow.config import (
    Config,
    from_dict,
    load_yaml,
    parse_overrides,
    to_dict,
    update,
    validate,
    yaml_load,
)
from phenoflow.errors import ConfigError, PhenoflowError

# The fields that decide the shape of the model's weights (and what they mean): a config that differs from the
# checkpoint's in one of them cannot load or would misread it (model.size: through depth/hidden_size/num_heads).
CHECKPOINT_FIELDS = (
    "data.modality", "data.image_size", "data.channels",
    "model.arch", "model.patch_size", "model.depth", "model.hidden_size", "model.num_heads",
    "model.mlp_ratio", "model.num_perturbations", "model.num_experiments", "model.num_cell_types",
    "model.long_skip", "model.unet_base_channels", "model.unet_channel_mult", "model.unet_num_res_blocks",
    "model.mlp_width", "model.mlp_depth", "expr.max_combination",
)
# Fields a resumed run may change: its length, logging/checkpoint intervals, evaluation, where the folder lives,
# and how (not what) it computes. Everything else changes what the checkpoint's state means and is refused.
RESUME_ALLOWED = {
    "train.total_samples", "train.log_every_samples", "train.ckpt_every_samples", "train.max_nonfinite_steps",
    "train.weight_guard", "train.init_from", "train.init_ema", "train.engine", "train.device",
    "train.micro_batch_size", "train.zero_stage", "train.cpu_offload", "train.deepspeed_config", "train.compile",
    "train.activation_checkpointing", "model.kernels", "model.attn_backend", "data.num_workers", "data.backend",
    "data.checksums", "data.bad_sample_policy", "data.channels_last",
    "train.peer_timeout_s", "train.collective_timeout_s",  # failure detection (docs/distributed.md)
}
RESUME_ALLOWED_SECTIONS = ("eval.", "run.")
# Interval, retention and reporting settings (e.g. train.log_every_steps, train.keep_snapshots, train.peak_tflops).
RESUME_ALLOWED_WORDS = ("every", "keep", "snapshot", "peak", "progress", "tensorboard")


class RunFolderError(PhenoflowError, FileNotFoundError):
    """A path given as a run folder or export that is neither (or lacks what the command needs)."""


class LabelError(PhenoflowError, KeyError):
    """A label name that is not in the model's vocabulary; the message lists close known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class RunRef:
    """Where a run's parts are. run_dir: the run folder (None for an export folder on its own); export_dir: the
    folder with model.json (None before the first export); config_file: config.yaml or model.json."""
    path: Path
    run_dir: Path | None
    export_dir: Path | None
    config_file: Path

    @property
    def home(self) -> Path:
        """The folder outputs go to by default (report/, samples/): the run folder, else the export folder."""
        return self.run_dir or self.path

    @property
    def meta(self) -> dict:
        return _json(self.export_dir / "model.json") if self.export_dir else {}


def _json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return obj


def find_run(path: str | Path) -> RunRef:
    """A run folder (config.yaml) or an export folder (model.json); RunFolderError naming what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise RunFolderError(f"{p}: no such run folder or export folder" if not p.exists() else
                             f"{p}: not a folder (give a run folder such as runs/NAME or an export folder)")
    if (p / "config.yaml").is_file():
        export = p / "export"
        return RunRef(p, p, export if (export / "model.json").is_file() else None, p / "config.yaml")
    if (p / "export" / "model.json").is_file():  # a run folder without its config.yaml: the export's config
        return RunRef(p, p, p / "export", p / "export" / "model.json")
    if (p / "model.json").is_file():
        parent = p.parent if p.name == "export" and (p.parent / "config.yaml").is_file() else None
        return RunRef(p, parent, p, p / "model.json")
    raise RunFolderError(f"{p} is neither a run folder (no config.yaml) nor an export folder (no model.json)")


def saved_config(ref: RunRef) -> Config:
    """The config the run was trained with: its config.yaml, else the export's model.json."""
    if ref.config_file.name == "model.json":
        meta = ref.meta
        try:
            return from_dict(meta.get("config", meta))
        except ConfigError as e:
            raise ConfigError(f"{ref.config_file}: {e}") from e
    return load_yaml(ref.config_file)


def set_location(cfg: Config, folder: Path) -> Config:
    """Point cfg.run_dir at `folder` (run.out_dir = its parent, run.name = its name)."""
    folder = Path(folder)
    if folder.name in ("", ".", ".."):  # `--run-dir .` from inside the run folder
        folder = folder.resolve()
    cfg.run.out_dir, cfg.run.name = str(folder.parent), folder.name
    return cfg


def config_for_run(ref: RunRef, overrides: list[str] | None = None, base: Config | None = None,
                   check: bool = True) -> Config:
    """The run's saved config (or `base`, e.g. an explicit --preset) + overrides, located in the run's folder,
    validated and checked against the checkpoint. run.name / run.out_dir overrides are refused: the folder is
    given."""
    parsed = parse_overrides(overrides or [])
    moved = sorted(f"run.{k}" for k in parsed.get("run", {}))
    if moved:
        raise ConfigError(f"{', '.join(moved)}: the run folder is given ({ref.path}); drop these overrides")
    cfg = base if base is not None else saved_config(ref)
    update(cfg, parsed)
    set_location(cfg, ref.home)
    validate(cfg)
    if check:
        check_against_checkpoint(cfg, ref)
    return cfg


def flat(values: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in values.items() if isinstance(sec, dict) for k, v in sec.items()}


def effective(values: dict[str, Any]) -> dict[str, Any]:
    """Flat config values with model.depth/hidden_size/num_heads = 0 replaced by the model.size preset's (the
    shape the model is built with), so `model.depth=4` equals a size whose depth is 4."""
    from phenoflow.config_validate import MODEL_SIZES

    out = dict(values)
    size = MODEL_SIZES.get(str(out.get("model.size")))
    if size is not None:
        for k, v in zip(("model.depth", "model.hidden_size", "model.num_heads"), size):
            if not out.get(k):
                out[k] = v
    return out


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, str)) else str(v).lower() if isinstance(v, bool) else str(v)


def check_against_checkpoint(cfg: Config, ref: RunRef) -> None:
    """ConfigError listing each CHECKPOINT_FIELDS value of cfg that differs from the one the run's weights were
    built with (the export's model.json, else config.yaml), and model.num_* against the exported vocabularies."""
    if ref.export_dir is not None:
        meta, source = ref.meta, ref.export_dir / "model.json"
        trained = flat(meta.get("config", {}))
    else:
        source = ref.config_file
        trained = flat(to_dict(saved_config(ref)))
    trained, now = effective(trained), effective(flat(to_dict(cfg)))
    bad = [f"{k}={_fmt(now[k])} (trained with {_fmt(trained[k])})" for k in CHECKPOINT_FIELDS
           if k in trained and k in now and trained[k] != now[k]]  # model.size counts through depth/hidden/heads
    if bad:
        raise ConfigError(f"the config conflicts with the run's checkpoint ({source}): " + "; ".join(bad)
                          + f". Give `--run-dir {ref.path}` without --preset/--config (the run's own config) and "
                          "drop these overrides, or finetune a new run from it with train.init_from")


def run_vocabs(ref: RunRef) -> dict[str, list[str]]:
    """The model's label vocabularies {group: [names]}: the export's manifest, else the run's vocab.json."""
    for p in ([ref.export_dir / "manifest.json"] if ref.export_dir else []) + (
            [ref.run_dir / "vocab.json"] if ref.run_dir else []):
        if p.is_file():
            obj = _json(p)
            vocabs = obj.get("vocabs", obj) if p.name == "manifest.json" else obj
            return {g: _names(v) for g, v in vocabs.items()}
    return {}


def _names(v: Any) -> list[str]:
    return [str(n) for n in (v.get("names", []) if isinstance(v, dict) else v)]


def close_names(name: str, names: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return close or [x for x in names if name.lower() in x.lower()][:n]


def label_remap(model_vocabs: dict[str, list[str]], data_vocabs: dict[str, Any], where: str,
                groups: tuple[str, ...] | None = None) -> dict[str, Any]:
    """{group: index tensor} mapping the data's label ids to the model's, by name, for each group whose names
    differ (empty when every vocabulary is identical). A data name the model lacks is a ConfigError naming the
    names, the group, the data (`where`) and close names the model knows."""
    import torch

    out, problems = {}, []
    for g, names in model_vocabs.items():
        if g == "gene" or (groups is not None and g not in groups) or g not in data_vocabs:
            continue
        data = _names(data_vocabs[g])
        if data == names:
            continue
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in data if n not in index]
        if unknown:
            hints = [f"{u!r} (close: {', '.join(close_names(u, names)) or 'none'})" for u in unknown[:5]]
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            problems.append(f"{g}: {'; '.join(hints)}{more} not among the model's {len(names)} names")
            continue
        out[g] = torch.tensor([index[n] for n in data], dtype=torch.long)
    if problems:
        raise ConfigError(f"the labels of {where} do not match the model's vocabularies (compared by name): "
                          + " | ".join(problems) + ". The data was converted differently from the run's training "
                          "data (e.g. with or without --label-with-dose); convert it the same way")
    return out


def apply_remap(labels: dict[str, Any], remap: dict[str, Any]) -> dict[str, Any]:
    """labels with each remapped group's ids translated (padding ids < 0 kept); a new dict."""
    import torch

    out = dict(labels)
    for g, table in remap.items():
        if g in out and torch.is_tensor(out[g]):
            ids = out[g]
            mapped = table.to(ids.device)[ids.clamp(min=0)]
            out[g] = torch.where(ids >= 0, mapped, ids)
    return out


# ---- resume ------------------------------------------------------------------------------------------------
def has_checkpoint(run_dir: Path) -> bool:
    c = Path(run_dir) / "checkpoints"
    return (c / "latest.pt").exists() or (c / "native" / "latest.json").exists()


def resume_allowed(field: str) -> bool:
    return (field in RESUME_ALLOWED or field.startswith(RESUME_ALLOWED_SECTIONS)
            or (field.startswith("train.") and any(w in field for w in RESUME_ALLOWED_WORDS)))


def resume_changes(cfg: Config) -> tuple[list[str], list[str]]:
    """(allowed, refused) 'field: old -> new' lines for a run that resumes from cfg.run_dir's checkpoint; both
    empty when nothing resumes (no config.yaml or no checkpoint). Fields new to the schema are not compared."""
    run_dir = cfg.run_dir
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file() or not has_checkpoint(run_dir):
        return [], []
    try:
        saved = flat(yaml_load(saved_file.read_text()) or {})
    except Exception as e:  # an unreadable config.yaml: the trainer's own checks name it
        raise ConfigError(f"{saved_file}: cannot be read to compare with this resume ({e})") from e
    now = flat(to_dict(cfg))
    allowed, refused = [], []
    for k, v in now.items():
        if k in saved and saved[k] != v:
            ok = resume_allowed(k) or (k == "data.shards" and _same_labels(run_dir, v))
            (allowed if ok else refused).append(f"{k}: {_fmt(saved[k])} -> {_fmt(v)}")
    return allowed, refused


def _same_labels(run_dir: Path, shards: str) -> bool:
    """A moved shard folder: its manifest's vocabularies are the run's (vocab.json), name for name."""
    try:
        data = _json(Path(shards) / "manifest.json").get("vocabs", {})
        run = _json(Path(run_dir) / "vocab.json")
    except PhenoflowError:
        return False
    return bool(run) and {g: _names(v) for g, v in data.items()} == {g: _names(v) for g, v in run.items()}


def check_resume(cfg: Config, quiet: bool = False) -> list[str]:
    """Before a training command writes anything: refuse a resume that changes fields other than the allowed
    ones (ConfigError listing them); print and return the allowed changes."""
    allowed, refused = resume_changes(cfg)
    if refused:
        raise ConfigError(
            f"{cfg.run_dir} holds a run with a checkpoint; resuming it with this config would change "
            + "; ".join(refused) + f" (saved in {cfg.run_dir / 'config.yaml'}; nothing was written). Resume with "
            f"`phenoflow train --run-dir {cfg.run_dir}` (its saved config; allowed changes: train.total_samples, "
            "log/checkpoint intervals, eval.*, engine and device), start a new run (another run.name), or "
            f"finetune from it (train.init_from={cfg.run_dir})")
    if allowed and not quiet and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"[resume] {cfg.run_dir}: changed " + "; ".join(allowed), file=sys.stderr)
    return allowed
