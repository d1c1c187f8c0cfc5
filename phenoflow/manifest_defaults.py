"""Config values that come from the data's manifest unless set: image size, channels and the evaluation split.

The rule (image data, data.modality=microscopy; docs/data.md "Shapes and splits from the manifest"):
  - data.image_size=0 / data.channels=0 take the shape of the shards in data.shards (their manifest.json);
    eval.split="" (empty) takes the manifest's held-out split: the only split other than train that has images,
    else the first of test, val, seen, unseen, iid, ood that it has;
  - they are filled in when the config is resolved (phenoflow.config_validate.validate calls fill_from_manifest
    first), so config.yaml, the checkpoint and every later check see the real values;
  - a non-zero value (a preset's, such as bbbc021's 96 px RGB, or yours) is what you asked for: it is checked
    against the manifest before any work (phenoflow.train.preflight), and a mismatch is a ConfigError naming
    both values and the override to use;
  - with data.source=synthetic there is no manifest: image size and channels must be set; eval.split="" is val.
A missing or unreadable manifest while a value is to come from it is a ConfigError naming data.shards and the
fields. Reads manifest.json with json only (no phenoflow.data import: the config module must not import torch).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phenoflow.errors import ConfigError

HELD_OUT_ORDER = ("test", "val", "seen", "unseen", "iid", "ood")


def held_out_split(counts: dict[str, int], where: str) -> str:
    """The split to evaluate on when eval.split is empty (see the module docstring)."""
    have = [s for s, n in counts.items() if s != "train" and n]
    if len(have) == 1:
        return have[0]
    for s in HELD_OUT_ORDER:
        if s in have:
            return s
    raise ConfigError(f"eval.split is empty (from the manifest) but {where} has no held-out split to take (splits "
                      f"with images: {sorted(s for s, n in counts.items() if n)}); set eval.split")


def fill_from_manifest(cfg: Any) -> Any:
    """Fill data.image_size / data.channels (0) and eval.split ("") from data.shards' manifest; returns cfg."""
    d = cfg.data
    if getattr(d, "modality", "microscopy") != "microscopy":
        return cfg
    unset = [f for f, v in (("data.image_size", d.image_size), ("data.channels", d.channels),
                            ("eval.split", cfg.eval.split)) if v in (0, "")]
    if not unset:
        return cfg
    if d.source != "shards":
        shape = [f for f in unset if f != "eval.split"]
        if shape:
            raise ConfigError(f"{' and '.join(f + '=0' for f in shape)} take the shape from the manifest of "
                              f"data.shards, but data.source={d.source!r} has none: set {' and '.join(shape)}")
        cfg.eval.split = "val"  # the synthetic data's held-out split
        return cfg
    path = Path(d.shards) / "manifest.json"
    asked = ", ".join(f"{f}={'0' if f != 'eval.split' else chr(39) * 2}" for f in unset)
    try:
        m = json.loads(path.read_text())
        h, w, c = (int(x) for x in m["image_shape"])
        counts = {str(s): int(v["count"]) for s, v in m["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = "it does not exist" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{asked} take their values from the manifest of data.shards={d.shards!r}, but {path} "
                          f"cannot be read ({reason}): convert the data first (`phenoflow data convert`) or set "
                          f"{', '.join(unset)}") from None
    if d.image_size == 0:
        if h != w:
            raise ConfigError(f"data.image_size=0: the shards in {d.shards} hold {h}x{w} images, the model takes "
                              "square images (crop them when converting)")
        d.image_size = h
    if d.channels == 0:
        d.channels = c
    if cfg.eval.split == "":
        cfg.eval.split = held_out_split(counts, f"data.shards={d.shards!r}")
    return cfg
