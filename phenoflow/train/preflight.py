"""Checks of a config against its data and run folder, made before anything is written.

`validate` (phenoflow.config_validate) checks what the config alone decides. `preflight(cfg, world_size)`
adds what needs the data: the size of the train split (known from the config for synthetic data, from the
manifest for shards) against the batch per rank, the shards' image shape against data.image_size and
data.channels, their vocabularies against model.num_*, the eval split, and whether a checkpoint to resume
from is readable at all. It reads only (the manifest, a file's size and last bytes) and never writes, so a
run that fails it leaves no run folder, no config.yaml and no synthetic data behind. Every failure is a
ConfigError (or a CheckpointError) naming the fields and values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from phenoflow.errors import ConfigError

LABEL_FIELDS = (("perturbation", "num_perturbations"), ("experiment", "num_experiments"),
                ("cell_type", "num_cell_types"))


def micro_batch(cfg: Any, world_size: int) -> int:
    """Samples per rank per forward pass; ConfigError if the global batch does not split over the ranks."""
    t = cfg.train
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    if t.batch_size % world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the world size {world_size}")
    mb = t.micro_batch_size or t.batch_size // world_size
    if t.batch_size % (mb * world_size):
        raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={mb} x "
                          f"world size {world_size}")
    return mb


def data_summary(cfg: Any) -> dict[str, Any]:
    """What the run's data will hold: {"counts": {split: n}, "image_shape": (h, w, c), "vocab_sizes": {group: n},
    "where": a phrase naming the source}. Synthetic data from the config; shards from their manifest."""
    d = cfg.data
    if d.source == "synthetic":
        return {"counts": {"train": d.train_images, "val": d.val_images},
                "image_shape": (d.image_size, d.image_size, d.channels),
                # the generator's vocabularies: a control plus the perturbations, experiments, cell types
                "vocab_sizes": {"perturbation": d.num_perturbations + 1, "experiment": d.num_experiments,
                                "cell_type": d.num_cell_types},
                "where": "the synthetic data", "train": f"data.train_images={d.train_images}"}
    return shards_summary(d.shards, "data.shards")


def shards_summary(folder: str | Path, field: str) -> dict[str, Any]:
    """data_summary of a shard folder, read from its manifest; errors name `field` (e.g. data.shards)."""
    from phenoflow.data.shards import load_manifest

    try:
        m = load_manifest(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}={str(folder)!r}: {e}") from e
    try:
        counts = {s: int(v["count"]) for s, v in m["splits"].items()}
        h, w, c = (int(x) for x in m["image_shape"])
        vocab_sizes = {g: len(m["vocabs"][g]) for g, _ in LABEL_FIELDS if g in m["vocabs"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{field}={str(folder)!r}: {Path(folder) / 'manifest.json'} has a malformed "
                          f"splits/image_shape/vocabs field ({type(e).__name__}: {e})") from e
    return {"counts": counts, "image_shape": (h, w, c), "vocab_sizes": vocab_sizes,
            "where": f"the shards in {folder}", "train": f"the train split of {field}={str(folder)!r}"}


def check_data(cfg: Any, world_size: int, summary: dict[str, Any], evaluate: bool = False) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    h, w, c = summary["image_shape"]
    where = summary["where"]
    if (h, w) != (d.image_size, d.image_size):
        raise ConfigError(f"data.image_size={d.image_size} but {where} hold {h}x{w} images: set "
                          f"data.image_size={h} (or 0: the manifest's, phenoflow.manifest_defaults)")
    if c != d.channels:
        raise ConfigError(f"data.channels={d.channels} but {where} hold {c}-channel images: set data.channels={c} "
                          "(or 0: the manifest's)")
    for group, name in LABEL_FIELDS:
        n_cfg, n_data = getattr(m, name), summary["vocab_sizes"].get(group, 0)
        if n_cfg and n_data > n_cfg:
            raise ConfigError(f"model.{name}={n_cfg} is smaller than the {group} vocabulary of {where} ({n_data})")
    counts = summary["counts"]
    if "train" not in counts:
        raise ConfigError(f"{where} have no train split (splits: {sorted(counts)})")
    n_train = counts["train"]
    mb = micro_batch(cfg, world_size)
    if n_train // world_size < mb:
        # The trainer reads with drop_last=True: each rank needs at least one full micro batch of its part.
        per_rank = f", {n_train // world_size} per rank over {world_size} ranks" if world_size > 1 else ""
        raise ConfigError(f"train.batch_size={t.batch_size} (micro batch {mb} per rank) is larger than "
                          f"{summary['train']} ({n_train} images{per_rank}): the trainer drops incomplete batches, "
                          f"so no step could run; lower train.batch_size or use more data")
    if evaluate:
        check_eval_splits(summary, [cfg.eval.split])


def check_eval_splits(summary: dict[str, Any], splits: list[str]) -> None:
    counts = summary["counts"]
    for split in splits:
        if not counts.get(split):
            have = sorted(s for s, n in counts.items() if n)
            raise ConfigError(f"eval.split={split!r} has no images in {summary['where']} (splits with images: {have}); "
                              "set eval.split to one of them, or eval.split= (empty) for the manifest's held-out "
                              "split")


def check_resume_files(cfg: Any) -> None:
    """A consolidated checkpoint to resume from must look complete: present but empty or truncated is a
    CheckpointError naming it before any work (the full load happens in the trainer)."""
    from phenoflow.train.checkpoint import check_checkpoint_file

    latest = cfg.run_dir / "checkpoints" / "latest.pt"
    if latest.exists():
        check_checkpoint_file(latest)


def preflight(cfg: Any, world_size: int = 1, evaluate: bool = False) -> None:
    """Every check of `cfg` against its data and run folder that can be made before anything is written.
    `world_size`: the number of training processes; `evaluate`: the command also evaluates (eval.split)."""
    if cfg.data.modality == "expression":
        # The expression data's size is known only after preprocessing and splitting (expression_data.py):
        # the batch is checked against the ranks here, the cells per split when the loader opens them.
        micro_batch(cfg, world_size)
        if cfg.data.source == "anndata" and not cfg.expr.atlas and not Path(cfg.expr.h5ad).is_file():
            raise ConfigError(f"expr.h5ad={cfg.expr.h5ad!r} is not a file (data.source=anndata reads it)")
        if cfg.data.source == "anndata" and cfg.expr.atlas:
            from phenoflow.data.expression_data import atlas_files

            for name, path in atlas_files(cfg.expr.atlas).items():
                if not Path(path).is_file():
                    raise ConfigError(f"expr.atlas: dataset {name!r}: {path!r} is not a file")
    else:
        check_data(cfg, world_size, data_summary(cfg), evaluate=evaluate)
    check_resume_files(cfg)


def preflight_eval(cfg: Any, splits: list[str] | None = None, data_dir: str | Path | None = None) -> None:
    """`phenoflow evaluate` / `sample`: each split to generate for has images in the data (the config's data,
    or the shard folder given with --data-dir), checked before synthetic data or samples are written."""
    summary = data_summary(cfg) if data_dir is None else shards_summary(data_dir, "--data-dir")
    check_eval_splits(summary, list(splits or [cfg.eval.split]))
