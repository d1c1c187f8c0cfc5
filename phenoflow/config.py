"""Typed configuration: dataclasses, named presets, YAML load/dump, dotted overrides, validation.

One `Config` holds six sections (model, flow, data, train, eval, run). Presets live in one registry
(`PRESETS`); `resolve(preset, overrides)` builds a config, applies `section.field=value` overrides (values
parsed as YAML scalars/lists) and validates it. Every problem is a `ConfigError` that names the field,
raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phenoflow.config_validate import validate
from phenoflow.errors import ConfigError

__all__ = ["PRESETS", "Config", "ConfigError", "DataConfig", "EvalConfig", "FlowConfig", "ModelConfig",
           "RunConfig", "TrainConfig", "dump_yaml", "from_dict", "load_yaml", "parse_overrides", "preset",
           "resolve", "to_dict", "update", "validate"]


# ----------------------------------------------------------------------------------------------------------
# Sections.


@dataclass
class ModelConfig:
    arch: str = "mit"  # mit (microscopy transformer) | unet (gene-axis U-Net, expression) | mlp (expression ablation)
    size: str = "XL"  # S | B | L | XL | tiny, see phenoflow.model.mit.MIT_SIZES
    patch_size: int = 2
    # Overrides of the size preset (0 = take the preset's value).
    depth: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    # Image size and channel count come from the data section.
    # Label vocabulary sizes; 0 = taken from the data's vocabularies when the model is built.
    num_perturbations: int = 0
    num_experiments: int = 0
    num_cell_types: int = 0
    label_dropout: float = 0.15  # each label dropped to its null row independently (gives CFG)
    proj_dropout: float = 0.1  # dropout after the attention output projection
    long_skip: bool = True
    # Expression velocity fields (model.arch=unet|mlp; phenoflow/model/expression.py). CPU-sized defaults; the
    # PRiMeFlow shape reference is base 32, channel_mult [1, 2, 4, 8] (~5.8M parameters at 2,000 genes).
    unet_base_channels: int = 16
    unet_channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    unet_num_res_blocks: int = 2
    mlp_width: int = 512
    mlp_depth: int = 4
    kernels: str = "torch"  # torch | triton
    attn_backend: str = "auto"  # auto | flash_attn | sdpa | math


@dataclass
class FlowConfig:
    path: str = "linear"  # linear | vp | bridge
    bridge_sigma: float = 0.1
    coupling: str = "independent"  # independent | ot | control
    control_noise: float = 0.1  # std of the noise added to control images (coupling=control)
    time_sampler: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class DataConfig:
    modality: str = "microscopy"  # microscopy (images, MiT) | expression (single-cell, U-Net); phenoflow/modalities.py
    source: str = "synthetic"  # synthetic | shards
    shards: str = ""  # folder with a manifest (source=shards); synthetic data is written to run_dir/data
    image_size: int = 96
    channels: int = 6  # 6 (cell painting) or 3 (RGB)
    # Synthetic generator.
    num_perturbations: int = 8
    num_experiments: int = 3
    num_cell_types: int = 1
    train_images: int = 2048
    val_images: int = 256
    synth_seed: int = 0
    samples_per_shard: int = 1024
    # Loading.
    backend: str = "webdataset"  # webdataset | dali
    num_workers: int = 0
    shuffle_buffer: int = 1000
    bad_sample_policy: str = "error"  # error | skip (counted and logged)
    # When image bytes are checked against the crc32 in the shard's label table: first_pass (the first read of
    # each sample after a start or resume; ~40 us per 96x96x6 crop, first epoch only), always, off.
    checksums: str = "first_pass"
    # Batches as a (B, C, H, W) view of the HWC buffer (channels-last strides) instead of a CHW copy: same
    # values, a third of the loader's CPU cost for raw shards (webdataset backend).
    channels_last: bool = True
    # Augmentation (paper: random h/v flips, uniform dequantisation x + U[0,1)/128 on [-1, 1] data).
    hflip: bool = True
    vflip: bool = True
    dequantize: bool = True


@dataclass
class ExpressionConfig:
    """Single-cell expression data (data.modality=expression): where the labels live in the AnnData file
    (PerturBench conventions by default), gene selection, the split, and the synthetic count generator."""
    h5ad: str = ""  # data.source=anndata: this file is preprocessed, split and converted to shards in run_dir/data
    perturbation_col: str = "condition"
    control_label: str = "control"
    combination_sep: str = "+"
    covariates: list[str] = field(default_factory=lambda: ["cell_type"])
    dose_col: str = "dose"
    dataset_col: str = "dataset"
    counts_layer: str = "counts"
    n_top_genes: int = 4000  # highly variable genes, united with every measured target gene
    split_task: str = "combine"  # transfer | combine | combine_inverse (PerturBench)
    split_seed: int = 42
    max_combination: int = 2  # components per perturbation label (A+B: 2)
    # data.source=synthetic: negative-binomial counts with known effects (phenoflow/data/synthetic_counts.py)
    synth_cells: int = 3000
    synth_genes: int = 256
    synth_cell_types: int = 2


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch
    micro_batch_size: int = 0  # 0 = batch_size / world size (no accumulation)
    total_samples: int = 256 * 150_000  # training length counted in samples seen
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    ema_stds: list[float] = field(default_factory=lambda: [0.01, 0.05])
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    engine: str = "single"  # single | ddp | deepspeed | fsdp2
    zero_stage: int = 2
    cpu_offload: bool = False  # deepspeed: optimizer states and fp32 masters in CPU memory (ZeRO-Offload)
    deepspeed_config: str = ""  # deepspeed: a JSON file whose keys override the generated DeepSpeed config
    compile: bool = False
    activation_checkpointing: bool = False
    log_every_samples: int = 256 * 100
    ckpt_every_samples: int = 256 * 5000
    max_nonfinite_steps: int = 10
    # After each optimizer step, check the weights are finite and undo a step that made them non-finite (one
    # fused norm, ~1 ms per step on the demo preset; memory: one more fp32 copy of this rank's weights).
    weight_guard: bool = True
    # Finetuning (docs/finetune.md): a NEW run starts from these weights (a run folder, an export folder or a
    # consolidated latest.pt; read only through safetensors / weights_only), matched to this run's label
    # vocabularies and genes by name; optimizer state and sample count start fresh. A resumed run ignores it.
    init_from: str = ""
    init_ema: float = 0.0  # 0 = the source's raw weights, else one of its EMA widths (e.g. 0.05)
    trainable: str = "all"  # all | adaln (MiT: adaLN modulation + label tables) | conditioning (expression)


@dataclass
class EvalConfig:
    solver: str = "dopri5"  # dopri5 | heun | euler
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 50  # for fixed-step solvers
    guidance: list[float] = field(default_factory=lambda: [1.0])  # w = 1: no guidance
    guidance_groups: list[str] = field(default_factory=lambda: ["perturbation"])
    split: str = "val"
    batch_size: int = 64
    max_images: int = 0  # 0 = every real image of the split
    features: list[str] = field(default_factory=lambda: ["morphology"])  # morphology | inception | dinov2
    inception_weights: str = ""  # local path to the converted Inception-v3 weights
    dinov2_weights: str = ""  # local path to DINOv2 ViT-L/14 weights
    ema_std: float = 0.01  # which EMA width to sample from (0 = raw weights); 0.01 as in the public MiT code
    per_perturbation: bool = False  # also FD/KD per perturbation (phenoflow.eval; those with >= 2 images per set)
    include_controls: bool = False  # also generate/score control images (MiT RxRx1 protocol: controls are not scored)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run folder is out_dir/name


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    expr: ExpressionConfig = field(default_factory=ExpressionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


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


# ----------------------------------------------------------------------------------------------------------
# Presets: one registry of named configurations.

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(name: str):
    def register(fn: Callable[[], Config]) -> Callable[[], Config]:
        PRESETS[name] = fn
        return fn

    return register


@preset("demo")
def _demo() -> Config:
    """The embedded default: a tiny MiT on 32 px synthetic 6-channel cell painting, a few minutes on 2 CPU cores."""
    c = Config()
    c.run.name = "demo"
    c.model.size, c.model.patch_size = "tiny", 4
    c.model.proj_dropout = 0.0
    c.data.image_size, c.data.channels = 32, 6
    c.data.num_perturbations, c.data.num_experiments = 4, 2
    c.data.train_images, c.data.val_images, c.data.samples_per_shard = 2048, 128, 512
    # 1,200 steps of 32 (more updates beat larger batches at this budget: FD_morph 56 against 73 for 600 of 64).
    c.train.batch_size, c.train.total_samples, c.train.lr = 32, 32 * 1200, 1e-3
    c.train.log_every_samples, c.train.ckpt_every_samples = 32 * 100, 32 * 400
    c.eval.ema_std = 0.05  # a short run: the wider average of the two tracked widths
    c.eval.solver, c.eval.steps, c.eval.batch_size = "heun", 20, 64
    c.eval.guidance = [1.0, 2.0]
    return c


@preset("mit-xl2-rxrx1")
def _rxrx1() -> Config:
    """The paper's RxRx1 run: MiT-XL/2, 96x96x6, batch 256, 150k steps, Adam 1e-4, clip 0.5, EMA."""
    c = Config()
    c.run.name = "mit-xl2-rxrx1"
    c.data.source = "shards"
    c.data.shards = "data/rxrx1"
    c.eval.guidance = [1.0, 1.5, 2.0]
    c.eval.features = ["inception", "dinov2", "morphology"]
    return c


@preset("mit-xl2-pretrain")
def _pretrain() -> Config:
    """Phenoprints-scale pretraining: MiT-XL/2, 1M steps at global batch 256 on 32 GPUs with ZeRO-2."""
    c = _rxrx1()
    c.run.name = "mit-xl2-pretrain"
    c.data.shards = "data/phenoprints"
    c.data.backend = "dali"
    c.data.num_workers = 8
    c.train.total_samples = 256 * 1_000_000
    c.train.engine, c.train.zero_stage = "deepspeed", 2
    c.train.micro_batch_size = 8  # 32 GPUs x 8
    return c


@preset("mit-xl2h64-rxrx1")
def _rxrx1_h64() -> Config:
    """MiT-XL/2 with 18 heads of 64 (same width and parameters) instead of 16 of 72: no FlashAttention padding."""
    c = _rxrx1()
    c.run.name = "mit-xl2h64-rxrx1"
    c.model.size = "XL-h64"
    return c


@preset("bbbc021")
def _bbbc021() -> Config:
    """BBBC021 (RGB 96x96 crops of compound treatments), MiT-XL/2 with one-hot compound labels."""
    c = _rxrx1()
    c.run.name = "bbbc021"
    c.data.shards = "data/bbbc021"
    c.data.channels = 3
    return c


def _expression(c: Config) -> Config:
    c.data.modality, c.model.arch = "expression", "unet"
    c.model.proj_dropout = 0.0
    c.data.samples_per_shard = 4096
    c.flow.path = "linear"
    return c


@preset("expression-demo")
def _expression_demo() -> Config:
    """Expression on the CPU: synthetic negative-binomial counts with known effects (3,000 cells x 256 genes,
    combinations held out), a small gene-axis U-Net (base 16, channel_mult [1, 2, 4]), a few minutes."""
    c = _expression(Config())
    c.run.name = "expression-demo"
    c.train.batch_size, c.train.total_samples, c.train.lr = 64, 64 * 600, 1e-3
    c.train.log_every_samples, c.train.ckpt_every_samples = 64 * 50, 64 * 200
    c.eval.ema_std = 0.05
    c.eval.solver, c.eval.steps = "euler", 50
    # The combine split puts the held-out combination in test (val holds only controls at this size).
    c.eval.split, c.eval.guidance, c.eval.batch_size = "test", [1.0, 2.0], 256
    return c


@preset("primeflow-norman")
def _primeflow_norman() -> Config:
    """PRiMeFlow on PerturBench's Norman19 (K562, CRISPRa singles and A+B combinations, `combine` split): the
    gene-axis U-Net at the PRiMeFlow shape reference (base 32, channel_mult [1, 2, 4, 8]) on 4,000 HVGs plus
    targets. Point expr.h5ad at the PerturBench-processed norman19 h5ad."""
    c = _expression(Config())
    c.run.name = "primeflow-norman"
    c.data.source, c.expr.h5ad = "anndata", "data/norman19.h5ad"
    c.model.unet_base_channels, c.model.unet_channel_mult = 32, [1, 2, 4, 8]
    c.train.batch_size, c.train.total_samples, c.train.lr = 256, 256 * 50_000, 1e-4
    c.train.log_every_samples, c.train.ckpt_every_samples = 256 * 200, 256 * 5000
    c.eval.solver, c.eval.steps = "euler", 100
    return c


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
