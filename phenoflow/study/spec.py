"""A design-space study: a base configuration plus named variants, each trained (or reusing another variant's
runs) and evaluated with one shared protocol (docs/study.md).

Spec file (YAML):
    name: my-study                 # the study folder is out_dir/name
    out_dir: studies               # default: studies
    base: demo                     # a preset (or config: FILE.yaml)
    overrides: [...]               # applied to every variant
    protocol: [eval.guidance=[1,2], eval.max_images=256, ...]   # the shared evaluation protocol, applied last
    seeds: [0]                     # train.seed values, per variant unless it gives its own
    variants:
      - name: B-mit                # [A-Za-z0-9._-]
        label: noise -> data       # free text for the tables
        config: B                  # the paper's configuration letter (A-E) the findings look for; optional
        overrides: [flow.coupling=independent]
        seeds: [0, 1]
        eval_mode: generate        # generate | counterfactual (inversion from a control, Config C/E) |
                                   # control (x0 = control + flow.control_noise * z, Config A)
      - name: C-mit
        reuse: B-mit               # no training: evaluates B-mit's runs
        eval_mode: counterfactual
        eval_overrides: [eval.solver=heun, eval.steps=20]   # eval.* only, never a protocol field

Every variant's resolved data section and protocol fields (PROTOCOL_FIELDS) must be equal: the same real images,
split, features and guidance strengths for all. A variant may not override a protocol field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phenoflow.errors import ConfigError

PROTOCOL_FIELDS = ("eval.split", "eval.features", "eval.guidance", "eval.guidance_groups", "eval.max_images",
                   "eval.include_controls", "eval.ema_std", "eval.inception_weights", "eval.dinov2_weights")
EVAL_MODES = ("generate", "counterfactual", "control")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    label: str = ""
    config: str = ""  # the paper's letter (A-E) or "" (used by the findings)
    eval_mode: str = "generate"
    reuse: str = ""  # evaluate this other variant's runs (no training)
    eval_overrides: list[str] = field(default_factory=list)


@dataclass
class Study:
    name: str
    variants: list[Variant]
    base: str = "demo"
    config_file: str = ""
    overrides: list[str] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "studies"
    description: str = ""

    @property
    def study_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"study {self.name}: no variant {name!r} (variants: {[v.name for v in self.variants]})")

    def seeds_of(self, v: Variant) -> list[int]:
        if v.reuse:
            return self.seeds_of(self.variant(v.reuse))
        return list(v.seeds) if v.seeds is not None else list(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "out_dir": self.out_dir, "description": self.description, "base": self.base,
               "config": self.config_file, "overrides": self.overrides, "protocol": self.protocol,
               "seeds": self.seeds, "variants": []}
        for v in self.variants:
            out["variants"].append({k: getattr(v, k) for k in ("name", "label", "config", "overrides", "seeds",
                                                               "eval_mode", "reuse", "eval_overrides")})
        return out


def _keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].strip() for o in overrides]


def _strs(x: Any, what: str) -> list[str]:
    if x is None:
        return []
    if not isinstance(x, list) or not all(isinstance(i, str) and "=" in i for i in x):
        raise ConfigError(f"{what} must be a list of KEY=VALUE strings, got {x!r}")
    return list(x)


def from_dict(d: dict[str, Any], out_dir: str | None = None) -> Study:
    """A Study from its YAML mapping; every check that needs no configuration resolved."""
    if not isinstance(d, dict) or not d.get("name") or not d.get("variants"):
        raise ConfigError("a study spec needs a name and a non-empty list of variants")
    unknown = set(d) - {"name", "out_dir", "base", "config", "overrides", "protocol", "seeds", "variants",
                        "description"}
    if unknown:
        raise ConfigError(f"study spec: unknown key(s) {sorted(unknown)}")
    variants = []
    for i, raw in enumerate(d["variants"]):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"study spec: variant {i} needs a name")
        bad = set(raw) - {"name", "label", "config", "overrides", "seeds", "eval_mode", "reuse", "eval_overrides"}
        if bad:
            raise ConfigError(f"study variant {raw['name']!r}: unknown key(s) {sorted(bad)}")
        v = Variant(name=str(raw["name"]), overrides=_strs(raw.get("overrides"), f"variant {raw['name']} overrides"),
                    seeds=[int(s) for s in raw["seeds"]] if raw.get("seeds") is not None else None,
                    label=str(raw.get("label", "")), config=str(raw.get("config", "")),
                    eval_mode=str(raw.get("eval_mode", "generate")), reuse=str(raw.get("reuse", "") or ""),
                    eval_overrides=_strs(raw.get("eval_overrides"), f"variant {raw['name']} eval_overrides"))
        variants.append(v)
    study = Study(name=str(d["name"]), variants=variants, base=str(d.get("base", "demo")),
                  config_file=str(d.get("config", "") or ""), overrides=_strs(d.get("overrides"), "overrides"),
                  protocol=_strs(d.get("protocol"), "protocol"), seeds=[int(s) for s in d.get("seeds", [0])],
                  out_dir=str(out_dir or d.get("out_dir", "studies")), description=str(d.get("description", "")))
    check(study)
    return study


def check(study: Study) -> None:
    if not _NAME.match(study.name):
        raise ConfigError(f"study name {study.name!r}: use letters, digits, '.', '_' and '-'")
    names = [v.name for v in study.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {study.name}: duplicate variant names in {names}")
    bad_protocol = [k for k in _keys(study.protocol) if not (k.startswith(("eval.", "data.")))]
    if bad_protocol:
        raise ConfigError(f"study protocol: {bad_protocol} are not eval.* or data.* fields")
    protected = set(PROTOCOL_FIELDS) | {k for k in _keys(study.protocol)}
    for v in study.variants:
        if not _NAME.match(v.name):
            raise ConfigError(f"study variant name {v.name!r}: use letters, digits, '.', '_' and '-'")
        if v.eval_mode not in EVAL_MODES:
            raise ConfigError(f"study variant {v.name}: eval_mode={v.eval_mode!r} is not one of {list(EVAL_MODES)}")
        clash = sorted(protected & set(_keys(v.overrides + v.eval_overrides)))
        if clash:
            raise ConfigError(f"study variant {v.name}: overrides protocol field(s) {clash}; every variant is "
                              f"evaluated with the same protocol (set them in the study's protocol list)")
        clash = [k for k in _keys(v.overrides) if k.startswith("data.")]
        if clash:
            raise ConfigError(f"study variant {v.name}: overrides data field(s) {clash}; all variants train and "
                              f"score on the same data (set them in the study's overrides)")
        not_eval = [k for k in _keys(v.eval_overrides) if not k.startswith("eval.")]
        if not_eval:
            raise ConfigError(f"study variant {v.name}: eval_overrides may set eval.* only, not {not_eval}")
        if v.reuse:
            if v.reuse == v.name or v.reuse not in names:
                raise ConfigError(f"study variant {v.name}: reuse={v.reuse!r} is not another variant")
            src = study.variant(v.reuse)
            if src.reuse:
                raise ConfigError(f"study variant {v.name}: reuses {src.name}, which itself reuses {src.reuse}")
            if v.overrides or v.seeds is not None:
                raise ConfigError(f"study variant {v.name}: a reuse variant trains nothing; give eval_overrides "
                                  f"only (no overrides or seeds)")
        if any(s < 0 for s in study.seeds_of(v)):
            raise ConfigError(f"study variant {v.name}: seeds must be >= 0")


def load(path: str | Path, out_dir: str | None = None) -> Study:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study spec {p} does not exist (built-in studies: see `phenoflow study --list`)")
    return from_dict(yaml.safe_load(p.read_text()), out_dir)
