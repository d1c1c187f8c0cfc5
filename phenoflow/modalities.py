"""The modality registry: what a modality plugs into the one trainer, the one sampler and the one evaluator.

A modality supplies (in the spirit of torchtitan's train specs):

    prepare_data(cfg) -> Path            a shard folder with a manifest (written once when the data is synthetic)
    vocab_sizes(manifest) -> {group: n}  the label groups the model conditions on, from the manifest
    build_model(cfg, vocab_sizes, manifest) -> nn.Module    forward(x, t, labels) -> velocity, shaped like x
    batch_to_flow(cfg, batch, gen, device) -> (x1, labels)  a loader batch -> data sample x1 and label ids
    train_flops(model) -> float          training FLOP per sample (forward + backward); 0 = unknown, MFU omitted
    control_groups(manifest) -> groups   the label groups that define "the same condition" for the control pool
                                         of flow.coupling=control (phenoflow/train/control_pool.py)
    loss_mask(manifest) -> fn | None     fn(batch, device) -> (B, *x1.shape[1:]) bool, the entries of x1 that
                                         enter the loss (an atlas: genes a cell's dataset measures); None = all

Everything else (flow paths and couplings, engines, EMA, checkpoints, exact resume, logging, config, CLI) is
shared. This module is the only place that knows every modality; it imports their parts lazily so that a
microscopy run never imports scanpy and an expression run never imports the image generator's dependencies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from phenoflow.config import Config, ConfigError


@dataclass(frozen=True)
class Modality:
    name: str
    prepare_data: Callable[[Config], Path]
    vocab_sizes: Callable[[dict], dict[str, int]]
    build_model: Callable[[Config, dict[str, int], dict], torch.nn.Module]
    batch_to_flow: Callable[[Config, dict, torch.Generator, torch.device], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    train_flops: Callable[[torch.nn.Module], float]
    sample_noun: str  # what one sample is, for logs: "img", "cell"
    # flow.coupling=control: a sample's source is a control of the same values of these label groups
    control_groups: Callable[[dict], tuple[str, ...]] = lambda manifest: ()
    loss_mask: Callable[[dict], Callable[[dict, torch.device], torch.Tensor] | None] = lambda manifest: None


# ---- microscopy: MiT on uint8 cell-painting images --------------------------------------------------------

def _image_prepare(cfg: Config) -> Path:
    from phenoflow.data.prepare import prepare_data

    return prepare_data(cfg)


def _image_vocab_sizes(manifest: dict) -> dict[str, int]:
    from phenoflow.model.mit import LABEL_GROUPS

    vocabs = manifest["vocabs"]
    return {g: len(vocabs[g]) for g in LABEL_GROUPS if g in vocabs}


def image_network(cfg: Config, vocab_sizes: dict[str, int]) -> torch.nn.Module:
    """The image velocity field: the MiT (model.arch=mit), or the ADM-style 2D U-Net (model.arch=unet; the MiT
    paper's Configs A-E baseline; base model.unet_base_channels, levels model.unet_channel_mult, 2D attention
    below full resolution, dropout model.proj_dropout)."""
    if cfg.model.arch == "unet":
        from phenoflow.model.unet import build_unet2d

        m, d = cfg.model, cfg.data
        model = build_unet2d(d.image_size, d.channels, vocab_sizes, base_channels=m.unet_base_channels,
                             channel_mult=list(m.unet_channel_mult), num_res_blocks=m.unet_num_res_blocks,
                             dropout=m.proj_dropout, norm_groups=min(32, m.unet_base_channels),
                             head_channels=min(64, m.unet_base_channels), label_dropout=m.label_dropout)
        model.sample_shape = (d.channels, d.image_size, d.image_size)  # for the FLOP count
        return model
    from phenoflow.model.mit import build_model

    return build_model(cfg, vocab_sizes)


def _image_model(cfg: Config, vocab_sizes: dict[str, int], manifest: dict) -> torch.nn.Module:
    model = image_network(cfg, vocab_sizes)
    if cfg.mol.conditioning == "adaptor":  # molecule vectors of the labels -> the adaptor (docs/molecules.md)
        from phenoflow.data.molecules import build_molecule_table, data_dir_of
        from phenoflow.model.molecule_adaptor import attach_adaptor

        table = build_molecule_table(cfg.mol, manifest, data_dir_of(cfg), cfg.run_dir)
        attach_adaptor(model, cfg, table.vectors, table.has_molecule, table.dose_range)
    return model


def _image_batch(cfg: Config, batch: dict, gen: torch.Generator, dev: torch.device):
    """x1 = dequantise(flip(encode(image))) on [-1, 1] (ARCHITECTURE.md section 3); labels as integer ids."""
    from phenoflow.data.transforms import augment, encode
    from phenoflow.model.mit import LABEL_GROUPS

    image = batch["image"].to(dev, non_blocking=True)
    x1 = augment(encode(image), gen, hflip=cfg.data.hflip, vflip=cfg.data.vflip, dequantize=cfg.data.dequantize)
    labels = {g: batch[g].to(dev) for g in LABEL_GROUPS if g in batch}
    if cfg.mol.conditioning == "adaptor" and "dose" in batch:  # the adaptor's dose modulation
        labels["dose"] = torch.as_tensor(batch["dose"]).to(dev, torch.float32)
    return x1, labels


def _image_flops(model: torch.nn.Module) -> float:
    """MiT: the analytic FLOP model (model/flops.py). U-Net: torch's FLOP counter on one forward of one sample
    (convolutions and matmuls), times 3 for forward + backward."""
    if hasattr(model, "shape"):
        from phenoflow.model.flops import train_flops_per_image

        return train_flops_per_image(model.shape)
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros((1, *model.sample_shape), device=p.device, dtype=p.dtype)
    labels = {g: torch.zeros(1, dtype=torch.long, device=p.device) for g in model.num_classes}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, device=p.device), labels)
    return 3.0 * counter.get_total_flops()


def _image_control_groups(manifest: dict) -> tuple[str, ...]:
    """Config A: a control of the same experiment (batch effects) and cell type."""
    return tuple(g for g in ("experiment", "cell_type") if g in manifest["vocabs"])


MICROSCOPY = Modality("microscopy", _image_prepare, _image_vocab_sizes, _image_model, _image_batch, _image_flops,
                      "img", _image_control_groups)


# ---- expression: a velocity field over the gene axis (PRiMeFlow) on log1p expression --------------------------
# Label groups: the perturbation (components of a combination as (B, K) ids padded with -1; a combination
# embeds as the sum of its components), each covariate and the dataset as (B,) ids, the dose as a float.
EXPRESSION_NON_LABEL_VOCABS = ("gene",)


def _expr_prepare(cfg: Config) -> Path:
    from phenoflow.data.expression_data import prepare_expression_data

    return prepare_expression_data(cfg)


def _expr_vocab_sizes(manifest: dict) -> dict[str, int]:
    return {g: len(v) for g, v in manifest["vocabs"].items() if g not in EXPRESSION_NON_LABEL_VOCABS}


def _expr_model(cfg: Config, vocab_sizes: dict[str, int], manifest: dict) -> torch.nn.Module:
    from phenoflow.model.expression import build_expression_model

    m = cfg.model
    common = {"label_dropout": m.label_dropout, "dose": "dose" in manifest.get("label_columns", ["dose"])}
    from phenoflow.data.expression_embeddings import perturbation_vectors

    fixed = perturbation_vectors(cfg, manifest)  # gene / compound vectors from a file, or None
    if fixed is not None:
        common["fixed_embeddings"] = {"perturbation": fixed}
    if m.arch == "unet":
        opts = {"base_channels": m.unet_base_channels, "channel_mult": tuple(m.unet_channel_mult),
                "num_res_blocks": m.unet_num_res_blocks, "norm_groups": min(8, m.unet_base_channels)}
    else:
        opts = {"width": m.mlp_width, "depth": m.mlp_depth}
    return build_expression_model(m.arch, len(manifest["genes"]), vocab_sizes, **common, **opts)


def _expr_batch(cfg: Config, batch: dict, gen: torch.Generator, dev: torch.device):
    """x1 = log1p expression of the kept genes (B, G); labels: every label group of the batch plus the dose."""
    x1 = batch["x"].to(dev, non_blocking=True).float()
    groups = [g for g in batch if g not in ("x", "key", "is_control") and torch.is_tensor(batch[g])]
    return x1, {g: batch[g].to(dev) for g in groups}


def _expr_flops(model: torch.nn.Module) -> float:
    return 0.0  # no analytic count yet for the U-Net / MLP: MFU is not reported for expression runs


def _expr_control_groups(manifest: dict) -> tuple[str, ...]:
    """A control cell of the same covariates (e.g. cell_type) and source dataset: every label group but the
    perturbation (PerturBench's matched controls)."""
    return tuple(g for g in manifest["vocabs"] if g not in ("perturbation", *EXPRESSION_NON_LABEL_VOCABS))


def _expr_loss_mask(manifest: dict):
    """An atlas aligned on the union of its datasets' genes: a gene a cell's dataset does not measure is stored
    as 0 and must not enter the loss (it would teach the model that the gene is silent). The per-dataset
    measured-gene table is built once from the manifest's `unmeasured_genes`; None when every dataset
    measures every gene (a single file, or an intersection)."""
    unmeasured = manifest.get("unmeasured_genes") or {}
    if not unmeasured:
        return None
    names = list(manifest["vocabs"]["dataset"])
    table = torch.ones(len(names), int(manifest["n_genes"]), dtype=torch.bool)
    for d, genes in unmeasured.items():
        table[names.index(d), torch.as_tensor(genes, dtype=torch.long)] = False

    def mask(batch: dict, dev: torch.device) -> torch.Tensor:
        return table.to(dev)[batch["dataset"].to(dev).long()]

    return mask


EXPRESSION = Modality("expression", _expr_prepare, _expr_vocab_sizes, _expr_model, _expr_batch, _expr_flops,
                      "cell", _expr_control_groups, _expr_loss_mask)

MODALITIES: dict[str, Modality] = {"microscopy": MICROSCOPY, "expression": EXPRESSION}


def register(modality: Modality) -> Modality:
    MODALITIES[modality.name] = modality
    return modality


def get_modality(cfg_or_name: Config | str) -> Modality:
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.data.modality
    if name not in MODALITIES:
        raise ConfigError(f"data.modality={name!r} is not one of {sorted(MODALITIES)}")
    return MODALITIES[name]

