"""Validation of a resolved Config: choices, ranges, finite numbers, safe run names and the model's shape.

Every check here is made from the config alone (no data, no torch) and fails with a `ConfigError` that names
the field and its value. Checks that need the data (its manifest, split sizes) are in
phenoflow.train.preflight. Kept apart from phenoflow.config so that neither grows past a readable size; it
imports nothing from phenoflow except the error type, so phenoflow.config can import it without a circle.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from phenoflow.errors import ConfigError

# depth, hidden width, heads of each model.size (DiT shapes; "tiny" is for CPU work, "XL-h64" is XL with 18
# heads of 64). Kept here so that validation does not import torch; phenoflow.model.mit.MIT_SIZES is this table.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "XL-h64": (28, 1152, 18),
}

# Image size bounds. The model attends over T = (image_size / patch_size)^2 tokens: attention costs T^2 per
# head and layer and the fixed position table is T x hidden, so T is bounded; the synthetic generator and the
# loader hold whole images of image_size^2 x channels bytes, so the side is bounded too. The paper's shape is
# 96 px at patch 2 (2,304 tokens); 1024 px or 65,536 tokens (512 px at patch 2) leave ample room.
MAX_IMAGE_SIZE = 1024
MAX_TOKENS = 65536

CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("mit", "unet", "mlp"),
    "model.size": tuple(MODEL_SIZES),
    "model.kernels": ("torch", "triton"),
    "model.attn_backend": ("auto", "flash_attn", "sdpa", "math"),
    "model.prediction": ("velocity", "data"),
    "flow.path": ("linear", "vp", "bridge"),
    "flow.coupling": ("independent", "ot", "control"),
    "flow.time_sampler": ("uniform", "logit_normal"),
    "data.modality": ("microscopy", "expression"),
    "data.source": ("synthetic", "shards", "anndata"),
    "expr.split_task": ("transfer", "combine", "combine_inverse"),
    "expr.atlas_genes": ("union", "intersection"),
    "data.backend": ("webdataset", "dali"),
    "data.bad_sample_policy": ("error", "skip"),
    "data.checksums": ("first_pass", "always", "off"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.engine": ("single", "ddp", "deepspeed", "fsdp2"),
    "train.trainable": ("all", "adaln", "conditioning", "adaptor"),
    "mol.conditioning": ("onehot", "adaptor"),
    "mol.representation": ("fingerprint", "embedding"),
    "mol.embedding_key": ("name", "smiles"),
    "eval.solver": ("dopri5", "heun", "euler"),
    "eval.split": ("train", "val", "test", "iid", "ood", "seen", "unseen"),
}

POSITIVE = [
    "model.patch_size", "model.mlp_ratio",
    "data.image_size", "data.num_perturbations", "data.num_experiments", "data.num_cell_types",
    "data.train_images", "data.samples_per_shard", "data.shuffle_buffer",
    "train.batch_size", "train.total_samples", "train.lr", "train.max_nonfinite_steps", "train.collective_timeout_s",
    "eval.rtol", "eval.atol", "eval.steps", "eval.batch_size",
]
NON_NEGATIVE = [
    "model.depth", "model.hidden_size", "model.num_heads", "model.num_perturbations",
    "model.num_experiments", "model.num_cell_types", "data.val_images", "data.num_workers",
    "train.micro_batch_size", "train.weight_decay", "train.grad_clip", "train.seed", "eval.max_images",
    "eval.ema_std", "flow.bridge_sigma", "flow.control_noise", "train.init_ema",
    "train.log_every_samples", "train.log_every_steps", "train.ckpt_every_samples", "train.ckpt_every_steps",
    "train.snapshot_every_samples", "train.snapshot_every_steps", "train.snapshot_keep", "train.peak_tflops",
    "train.progress_every_s", "train.peer_timeout_s",
]
UNIT_INTERVAL = ["model.label_dropout", "model.proj_dropout", "train.beta1", "train.beta2"]
PROBABILITY = ["flow.control_noise_prob"]  # [0, 1]


def _get(cfg: Any, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def check_finite(cfg: Any) -> None:
    """Every float field (and every entry of a list-of-float field) is a finite number: inf and nan are
    accepted by YAML (.inf, .nan) and by float("inf"), and would otherwise reach the optimizer or solver."""
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sec))
        for f in dataclasses.fields(sec):
            tp, value = hints[f.name], getattr(sec, f.name)
            key = f"{section.name}.{f.name}"
            if tp is float:
                items = [(key, value)]
            elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
                items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            else:
                continue
            for k, v in items:
                if isinstance(v, (int, float)) and not math.isfinite(v):
                    raise ConfigError(f"{k}={v!r} must be a finite number")


def check_run_name(name: str) -> None:
    """run.name is one folder name inside run.out_dir: never a path, never '.' or '..' (which would put the
    run's files into run.out_dir itself or its parent), never an option-like or hidden-control name."""
    why = None
    if not name or not name.strip():
        why = "must not be empty"
    elif name in (".", ".."):
        why = "must not be '.' or '..' (the run would be written into run.out_dir or its parent)"
    elif "/" in name or "\\" in name:
        why = "must be a single folder name, without '/' or '\\' (absolute and nested paths are refused)"
    elif name.startswith("-"):
        why = "must not start with '-' (it would read as an option to shell tools)"
    elif name != name.strip():
        why = "must not start or end with whitespace"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        why = "must not contain control characters"
    elif len(name.encode()) > 255:
        why = "must be at most 255 bytes (a file-name limit)"
    if why:
        raise ConfigError(f"run.name={name!r} {why}")


def model_dims(cfg: Any) -> tuple[int, int, int]:
    """(depth, hidden size, heads) after the model.size preset and the per-field overrides (0 = preset)."""
    m = cfg.model
    depth, hidden, heads = MODEL_SIZES[m.size]
    return m.depth or depth, m.hidden_size or hidden, m.num_heads or heads


def check_model_shape(cfg: Any) -> None:
    """The model's shape is buildable: width divisible by heads and by 4, depth even with long skips, image
    size divisible by the patch and within the token and side bounds."""
    m, d = cfg.model, cfg.data
    depth, hidden, heads = model_dims(cfg)
    size = f" (model.size={m.size} gives depth {MODEL_SIZES[m.size][0]}, hidden {MODEL_SIZES[m.size][1]}, " \
           f"heads {MODEL_SIZES[m.size][2]}; 0 takes these)"
    if hidden % heads:
        raise ConfigError(f"model.num_heads={heads} does not divide the hidden size model.hidden_size={hidden}: "
                          f"each head takes hidden/heads channels{size}")
    if hidden % 4:
        raise ConfigError(f"model.hidden_size={hidden} must be divisible by 4 (the 2D sin-cos position embedding "
                          f"splits the width into quarters){size}")
    if m.long_skip and depth % 2:
        raise ConfigError(f"model.depth={depth} must be even with model.long_skip=true (the first half's outputs "
                          f"are merged into the second half){size}")
    if int(hidden * m.mlp_ratio) < 1:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio} with hidden size {hidden} gives an empty MLP")
    if d.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"data.image_size={d.image_size} is above the maximum of {MAX_IMAGE_SIZE} px (whole images "
                          f"of image_size^2 x channels bytes are generated, read and batched; crop or tile larger "
                          f"images)")
    if d.image_size % m.patch_size:
        raise ConfigError(f"data.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}")
    tokens = (d.image_size // m.patch_size) ** 2
    if tokens > MAX_TOKENS:
        raise ConfigError(f"data.image_size={d.image_size} with model.patch_size={m.patch_size} gives "
                          f"({d.image_size}/{m.patch_size})^2 = {tokens} tokens, above the limit of {MAX_TOKENS} "
                          f"(attention costs tokens^2 per head and layer): use a larger model.patch_size or "
                          f"smaller images")


def check_modality(cfg: Any) -> None:
    """The model and data fields of the chosen modality (phenoflow/modalities.py)."""
    d, m, e = cfg.data, cfg.model, cfg.expr
    if m.prediction == "data" and not (d.modality == "microscopy" and m.arch == "mit" and cfg.flow.path == "linear"):
        raise ConfigError(f"model.prediction=data is for the MiT on the linear path (v = (x1_hat - x_t) / (1 - t)); "
                          f"got data.modality={d.modality}, model.arch={m.arch}, flow.path={cfg.flow.path}: set "
                          f"model.prediction=velocity (the demo preset predicts data)")
    if m.output_conv < 0 or (m.output_conv and m.arch != "mit"):
        raise ConfigError(f"model.output_conv={m.output_conv}: the MiT's convolutional output head takes K >= 1 "
                          f"channels (0 = the linear decoder), and only model.arch=mit has it (got {m.arch})")
    if d.modality == "microscopy":
        if m.arch not in ("mit", "unet"):
            raise ConfigError(f"model.arch={m.arch!r} is an expression model; data.modality=microscopy trains mit "
                              "or unet (the ADM U-Net)")
        if d.source == "anndata":
            raise ConfigError("data.source=anndata needs data.modality=expression")
        if m.arch == "mit":
            check_model_shape(cfg)
            return
        for key in ("model.unet_base_channels", "model.unet_num_res_blocks"):
            if not _get(cfg, key) > 0:
                raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
        if not m.unet_channel_mult or any(c <= 0 for c in m.unet_channel_mult):
            raise ConfigError(f"model.unet_channel_mult={m.unet_channel_mult} must be a non-empty list of positive ints")
        if m.unet_base_channels > 32 and m.unet_base_channels % 32:  # GroupNorm(32) over every level's channels
            raise ConfigError(f"model.unet_base_channels={m.unet_base_channels} must be a multiple of 32 (or below 32)")
        return
    if m.arch not in ("unet", "mlp"):
        raise ConfigError(f"model.arch={m.arch!r}: data.modality=expression trains unet or mlp")
    for key in ("expr.n_top_genes", "expr.max_combination", "expr.synth_cells", "expr.synth_genes",
                "expr.synth_cell_types", "model.unet_base_channels", "model.unet_num_res_blocks", "model.mlp_width",
                "model.mlp_depth"):
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    if not m.unet_channel_mult or any(c <= 0 for c in m.unet_channel_mult):
        raise ConfigError(f"model.unet_channel_mult={m.unet_channel_mult} must be a non-empty list of positive ints")
    if d.source == "anndata" and not e.h5ad and not e.atlas:
        raise ConfigError("expr.h5ad (one file) or expr.atlas (several) must name AnnData files when "
                          "data.source=anndata")
    if e.h5ad and e.atlas:
        raise ConfigError(f"expr.h5ad={e.h5ad!r} and expr.atlas={e.atlas}: give one file or an atlas, not both")
    if not e.perturbation_col or not e.control_label or not e.combination_sep:
        raise ConfigError("expr.perturbation_col, expr.control_label and expr.combination_sep must be non-empty")


def check_finetune(cfg: Any) -> None:
    """train.init_from / init_ema / trainable (docs/finetune.md). The source itself is checked only when a new
    run applies it (phenoflow/train/finetune.py): a resumed run, or the evaluation of a finetuned export, does
    not need it any more."""
    t = cfg.train
    if t.init_ema and not t.init_from:
        raise ConfigError(f"train.init_ema={t.init_ema} needs train.init_from")
    wants = {"adaln": "microscopy", "conditioning": "expression", "adaptor": "microscopy"}
    if t.trainable == "adaptor" and cfg.mol.conditioning != "adaptor":
        raise ConfigError("train.trainable=adaptor needs mol.conditioning=adaptor (docs/molecules.md)")
    if cfg.mol.conditioning == "adaptor" and (cfg.data.modality != "microscopy" or cfg.model.arch != "mit"):
        raise ConfigError("mol.conditioning=adaptor is for the MiT (data.modality=microscopy, model.arch=mit)")
    if cfg.mol.representation == "embedding" and cfg.mol.conditioning == "adaptor" and not cfg.mol.embeddings:
        raise ConfigError("mol.representation=embedding needs mol.embeddings (a CSV, NPY or Parquet file)")
    if cfg.mol.fp_radius < 0 or cfg.mol.fp_size < 1 or cfg.mol.adaptor_depth < 0 or cfg.mol.adaptor_heads < 0:
        raise ConfigError("mol.fp_radius, mol.adaptor_depth, mol.adaptor_heads must be >= 0 and mol.fp_size >= 1")
    if t.trainable in wants and cfg.data.modality != wants[t.trainable]:
        raise ConfigError(f"train.trainable={t.trainable!r} is for data.modality={wants[t.trainable]}, not "
                          f"{cfg.data.modality!r}")
    if t.trainable != "all" and t.engine not in ("single", "ddp"):
        raise ConfigError(f"train.trainable={t.trainable!r} needs train.engine=single or ddp (frozen parameters "
                          f"are not yet carried through the {t.engine} optimizer's partitions)")


def validate(cfg: Any) -> Any:
    """Check a Config (phenoflow.config.Config) in place; returns it. Raises ConfigError naming the field.
    First, values that come from the data's manifest (data.image_size/channels 0, eval.split "") are filled in
    (phenoflow.manifest_defaults)."""
    from phenoflow.manifest_defaults import fill_from_manifest

    fill_from_manifest(cfg)
    check_finite(cfg)
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {list(choices)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    for key in UNIT_INTERVAL:
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be in [0, 1)")
    for key in PROBABILITY:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be in [0, 1]")
    check_run_name(cfg.run.name)
    if cfg.data.channels not in (3, 6):
        raise ConfigError(f"data.channels={cfg.data.channels} must be 3 or 6")
    if cfg.model.patch_size not in (2, 4, 8):
        raise ConfigError(f"model.patch_size={cfg.model.patch_size} must be 2, 4 or 8")
    check_modality(cfg)
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage} must be 0, 1, 2 or 3")
    if not cfg.train.ema_stds or any(not 0 < s < 12 ** -0.5 for s in cfg.train.ema_stds):
        # std of the power-function profile is below 1/sqrt(12) ~ 0.2887 for every gamma > 0
        raise ConfigError(f"train.ema_stds={cfg.train.ema_stds} must be a non-empty list of values in (0, 1/sqrt(12) = 0.2887)")
    if cfg.eval.ema_std and cfg.eval.ema_std not in cfg.train.ema_stds:
        raise ConfigError(f"eval.ema_std={cfg.eval.ema_std} is not one of train.ema_stds={cfg.train.ema_stds}")
    if not cfg.eval.guidance or any(w < 0 for w in cfg.eval.guidance):
        raise ConfigError(f"eval.guidance={cfg.eval.guidance} must be a non-empty list of values >= 0")
    for b in cfg.eval.baselines:
        if b not in ("control", "additive"):
            raise ConfigError(f"eval.baselines entry {b!r} is not control or additive")
    for g in cfg.eval.guidance_groups:
        if g not in ("perturbation", "experiment", "cell_type"):
            raise ConfigError(f"eval.guidance_groups entry {g!r} is not perturbation, experiment or cell_type")
    for f in cfg.eval.features:
        if f not in ("morphology", "inception", "dinov2"):
            raise ConfigError(f"eval.features entry {f!r} is not morphology, inception or dinov2")
    if cfg.data.source == "shards" and not cfg.data.shards:
        raise ConfigError("data.shards must name a shard folder when data.source=shards")
    if cfg.train.deepspeed_config and not Path(cfg.train.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config={cfg.train.deepspeed_config!r} is not a file")
    if cfg.train.cpu_offload and cfg.train.engine != "deepspeed":
        raise ConfigError(f"train.cpu_offload=true needs train.engine=deepspeed, not {cfg.train.engine!r}")
    check_finetune(cfg)
    for what in ("log", "ckpt", "snapshot"):
        if getattr(cfg.train, f"{what}_every_samples") and getattr(cfg.train, f"{what}_every_steps"):
            raise ConfigError(f"train.{what}_every_samples and train.{what}_every_steps are both set: give one "
                              f"(or neither: scaled to the run)")
    mb = cfg.train.micro_batch_size
    if mb and cfg.train.batch_size % mb:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not a multiple of train.micro_batch_size={mb}")
    return cfg
