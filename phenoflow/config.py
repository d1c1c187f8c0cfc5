"""Typed configuration: YAML load/dump, dotted overrides, validation; the sections and presets re-exported.

One `Config` (`config_schema.py`) holds seven sections (model, flow, data, expr, train, eval, run); presets
are in `presets.py`. Presets live in one registry
(`PRESETS`); `resolve(preset, overrides)` builds a config, applies `section.field=value` overrides (values
parsed as YAML scalars/lists) and validates it. Every problem is a `ConfigError` that names the field,
raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from phenoflow.config_schema import (
    Config,
    DataConfig,
    EvalConfig,
    ExpressionConfig,
    FlowConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from phenoflow.config_validate import validate
from phenoflow.errors import ConfigError
from phenoflow.presets import PRESETS, preset

__all__ = ["PRESETS", "Config", "ConfigError", "DataConfig", "EvalConfig", "ExpressionConfig", "FlowConfig", "ModelConfig",
           "RunConfig", "TrainConfig", "dump_yaml", "from_dict", "load_yaml", "parse_overrides", "preset",
           "resolve", "to_dict", "update", "validate"]


# ----------------------------------------------------------------------------------------------------------
# Dict conversion with type checking.


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def update(cfg: Config, values: dict[str, Any]) -> Config:
    """Apply a nested dict ({section: {field: value}}) to cfg in place, checking names and types."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for sname, svalues in values.items():
        if sname not in sections:
            raise ConfigError(f"unknown config section {sname!r} (known: {sorted(sections)})")
        if not isinstance(svalues, dict):
            raise ConfigError(f"config section {sname!r} must be a mapping, got {svalues!r}")
        section = getattr(cfg, sname)
        types = _section_types(type(section))
        for k, v in svalues.items():
            if k not in types:
                raise ConfigError(f"unknown config field {sname}.{k} (known: {sorted(types)})")
            setattr(section, k, _check_type(f"{sname}.{k}", v, types[k]))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> Config:
    return validate(update(Config(), values))


def dump_yaml(cfg: Config, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (at any depth): plain YAML keeps the last
    value silently, so `lr: 1e-4` ... `lr: 1e-2` would train with the second without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"duplicate key {key!r} on line {line} (first on line {seen[key]})")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
        return super().construct_mapping(node, deep=deep)


# Booleans as YAML 1.2 reads them: only true/false. YAML 1.1 (PyYAML's default) also turns yes/no/on/off into
# booleans, so `data.checksums=off` would arrive as False and `run.name=no` could never be a name.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (ConfigError naming the key and its lines)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no Python tags


MAX_CONFIG_BYTES = 16 * 2**20


def read_config_text(path: str | Path) -> str:
    """The text of a YAML config file; a missing file, a folder, a device, an unreadable, huge or binary file
    (NUL bytes, not UTF-8) is a ConfigError naming the path."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {path}: no such file")
    if p.is_dir():
        raise ConfigError(f"config file {path}: is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {path}: not a regular file")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path}: {p.stat().st_size} bytes is too large for a config "
                              f"(limit {MAX_CONFIG_BYTES})")
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from e
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"config file {path}: a binary file (NUL byte at offset {nul}), not YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from e


def load_yaml(path: str | Path) -> Config:
    text = read_config_text(path)
    try:
        values = yaml_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {' '.join(str(e).split())}") from e
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config sections, got {type(values).__name__}")
    try:
        return from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from e


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """['train.batch_size=32', 'eval.guidance=[1,2]'] -> {'train': {'batch_size': 32}, 'eval': {...}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.field")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ConfigError) as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {' '.join(str(e).split())}") from e
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def resolve(preset_name: str = "demo", overrides: list[str] | None = None, config_file: str | None = None) -> Config:
    """Preset (or YAML file) + dotted overrides -> a validated Config. Fails naming the field or preset."""
    if config_file:
        cfg = load_yaml(config_file)
    else:
        if preset_name not in PRESETS:
            raise ConfigError(f"unknown preset {preset_name!r} (known: {sorted(PRESETS)})")
        cfg = PRESETS[preset_name]()
    update(cfg, parse_overrides(overrides or []))
    return validate(cfg)
