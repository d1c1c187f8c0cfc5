"""`phenoflow data ...` subcommands: synth, convert (public layouts -> shards), plan, verify, index.

``register(subparsers)`` adds the ``data`` command to the top-level parser (called by phenoflow/cli.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_synth(args: argparse.Namespace) -> int:
    from phenoflow.config import resolve

    from .prepare import spec_from_config, write_synthetic
    from .synthetic import effects_markdown

    cfg = resolve(args.preset, args.overrides, config_file=args.config)
    spec = spec_from_config(cfg)
    if args.compounds:
        from dataclasses import replace

        spec = replace(spec, compounds=True)
    counts = {"train": cfg.data.train_images, "val": cfg.data.val_images}
    t0 = time.perf_counter()
    m = write_synthetic(spec, args.out, counts, cfg.data.samples_per_shard, encoding=args.encoding,
                        workers=args.workers)
    dt = time.perf_counter() - t0
    n = sum(counts.values())
    print(f"wrote {n} synthetic {spec.image_size}x{spec.image_size}x{spec.channels} images to {args.out} in "
          f"{dt:.1f}s ({n / dt:.0f} images/s): " + ", ".join(
              f"{s}: {v['count']} samples in {len(v['shards'])} shards" for s, v in m["splits"].items()))
    if args.effects:
        print(effects_markdown(spec))
    return 0


def _cmd_synth_expression(args: argparse.Namespace) -> int:
    from .errors import DataError
    from .synthetic_counts import generate_counts, synthetic_atlas, write_h5ad
    from .synthetic_counts_effects import CountSpec, effects_markdown

    try:
        spec = CountSpec.for_genes(args.genes, n_cell_types=args.cell_types, seed=args.seed)
        if args.cells < 1:
            raise ValueError(f"--cells={args.cells} must be >= 1")
    except ValueError as e:
        raise DataError(f"data synth-expression: {e}") from e
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.atlas:
        names = tuple(f"atlas_{chr(ord('a') + i)}" for i in range(args.atlas))
        made = synthetic_atlas(spec, args.cells, names)
        paths = {n: write_h5ad(a, out.with_name(f"{out.stem}_{n}{out.suffix or '.h5ad'}")) for n, a in made.items()}
    else:
        made = {args.dataset: generate_counts(spec, args.cells, args.dataset)}
        paths = {args.dataset: write_h5ad(made[args.dataset], out)}
    dt = time.perf_counter() - t0
    for n, a in made.items():
        print(f"wrote {paths[n]}: {a.n_obs} cells x {a.n_vars} genes, {a.obs['condition'].nunique()} conditions "
              f"(control included), dataset {n}")
    print(f"{dt:.1f}s in all; counts in layers['counts'], .X = log1p(normalize_total 1e4), truth in "
          "uns['phenoflow_synthetic']")
    if args.effects:
        print(effects_markdown(spec))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    if args.layout == "anndata":  # h5ad -> expression shards (expression_shards.py)
        from .convert_out import clear_previous
        from .expression_shards import convert_cli

        # A non-empty --out needs --overwrite, which deletes the previous conversion first (not staged here).
        clear_previous(Path(args.out), args.overwrite)

        print(json.dumps(convert_cli(args), indent=1))
        return 0
    if not args.csv:
        from .errors import DataError

        raise DataError(f"data convert {args.layout}: --csv is required")
    from .convert_out import summary_text

    summary = convert(args.layout, args.csv, args.out, image_root=args.images,
                      samples_per_shard=args.samples_per_shard or 1024,
                      encoding=args.encoding, workers=args.workers, channels=args.channels,
                      bad_sample_policy=args.bad_sample_policy, seed=args.seed, image_size=args.image_size,
                      label_with_dose=args.label_with_dose, allow_outside_images=args.allow_outside_images,
                      overwrite=args.overwrite)
    print(json.dumps(summary, indent=1) if args.json else summary_text(summary))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import format_plan, plan

    p = plan(manifest_dir=args.manifest, images=args.images, shape=args.shape, encoding=args.encoding,
             samples_per_shard=args.samples_per_shard, gpus=args.gpus, images_per_s_per_gpu=args.images_per_s,
             bytes_per_image=args.bytes_per_image)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .shards import index_tar

    for tar in args.tars:
        print(index_tar(Path(tar)))
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    from .integrity import rebuild_label_tables

    n = rebuild_label_tables(args.folder)
    print(f"{args.folder}: wrote {n} label tables")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .integrity import verify_shards

    counts = verify_shards(args.folder, checksums=not args.no_checksums, progress=True)
    print(f"{args.folder}: OK " + ", ".join(f"{s}: {n} samples" for s, n in counts.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="synthetic data, converters from public layouts, shard planning")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="write synthetic cell-painting shards (data section of a preset + overrides)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--preset", default="demo", help="config preset whose data section is used (default demo)")
    p.add_argument("--config", default=None, help="a YAML config file instead of --preset")
    p.add_argument("--encoding", default="raw", choices=["raw", "npy", "png"])
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes (one shard per job)")
    p.add_argument("--compounds", action="store_true", help="compound perturbations with SMILES and doses")
    p.add_argument("--effects", action="store_true", help="print the table of known perturbation effects")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.image_size=64 data.train_images=10000")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("synth-expression", help="write synthetic single-cell counts with known perturbation effects "
                                                "(AnnData .h5ad, PerturBench conventions)")
    p.add_argument("--out", required=True, help="output .h5ad (with --atlas: <stem>_<dataset>.h5ad beside it)")
    p.add_argument("--cells", type=int, default=20000, help="cells per dataset (default 20000)")
    p.add_argument("--genes", type=int, default=2000, help="genes of the world (default 2000)")
    p.add_argument("--cell-types", type=int, default=2, help="cell types (default 2: K562, RPE1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="synthetic", help="dataset name (obs['dataset']; seeds the cells)")
    p.add_argument("--atlas", type=int, default=0,
                   help="write this many datasets (atlas_a, atlas_b, ...) with overlapping gene and perturbation sets")
    p.add_argument("--effects", action="store_true", help="print the table of known perturbation effects")
    p.set_defaults(func=_cmd_synth_expression)

    p = sub.add_parser("convert", help="convert a public layout (CellFlux/IMPA, MiT CSV, generic CSV) or an h5ad "
                                       "file (anndata) to shards")
    p.add_argument("layout", choices=["cellflux", "mit", "generic", "anndata"], help="input layout")
    p.add_argument("--csv", default=None, help="metadata CSV (image layouts)")
    p.add_argument("--images", default=None,
                   help="image root folder (default: found: the CSV's folder, its imgs/, or the imgs/ folder beside "
                        "the CSV's folder as in the public IMPA/CellFlux layout metadata/ + imgs/)")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--samples-per-shard", type=int, default=None, help="default 1024 (images), 4096 (anndata)")
    p.add_argument("--encoding", default="raw", choices=["raw", "npy", "png"])
    p.add_argument("--workers", type=int, default=1, help="parallel converter processes")
    p.add_argument("--h5ad", default=None, help="anndata: the .h5ad file (read on disk through h5py)")
    p.add_argument("--genes", default=None, help="anndata: kept gene list, one per line or a JSON list (default all)")
    p.add_argument("--split-csv", default=None, help="anndata: cell_id,split CSV (default: every cell in train)")
    p.add_argument("--columns", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="anndata: ExpressionColumns fields, e.g. perturbation=condition covariates=cell_type,treatment "
                        "dose=none dataset=dataset control=control separator=+")
    p.add_argument("--max-combination", type=int, default=2, help="anndata: most components of a perturbation")
    p.add_argument("--x-state", default="auto", choices=["auto", "counts", "normalized", "log1p"],
                   help="anndata: what .X holds (auto: detected, see expression_prep)")
    p.add_argument("--channels", default=None, help="comma-separated channel names (default: by channel count)")
    p.add_argument("--image-size", type=int, default=0, help="expected image size (0 = from the first image)")
    p.add_argument("--bad-sample-policy", default="error", choices=["error", "skip"])
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle before sharding")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="read image paths of the CSV that leave --images (absolute paths, '..'); refused by default")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous conversion in --out (its manifest, shards and label counts are deleted "
                        "first; other files are refused); without it a non-empty --out is refused")
    p.add_argument("--json", action="store_true",
                   help="print the full summary as JSON (per-label counts included) instead of the short summary")
    p.add_argument("--label-with-dose", action="store_true",
                   help="a compound at each dose is its own perturbation class (label <name>_<dose>; MiT layout: "
                        "perturbation_id_with_dose), as the MiT code conditions BBBC021")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("plan", help="bytes, shard count, per-GPU read rate and epoch time for a data set")
    p.add_argument("--manifest", default=None, help="a shard folder (its manifest) instead of --images/--shape")
    p.add_argument("--images", type=int, default=12_000_000, help="number of images (default 12M)")
    p.add_argument("--shape", default="96x96x6", help="HxWxC (default 96x96x6)")
    p.add_argument("--encoding", default="raw", choices=["raw", "npy", "png"])
    p.add_argument("--bytes-per-image", type=float, default=0.0, help="override the estimated encoded size")
    p.add_argument("--samples-per-shard", type=int, default=0, help="0 = chosen for ~1 GB shards")
    p.add_argument("--gpus", type=int, default=32)
    p.add_argument("--images-per-s", type=float, default=21.0, help="training images/s per GPU (MiT-XL/2: ~21)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("verify", help="check a shard folder: files, sizes, sha256 checksums, index counts, label "
                                      "tables against the json members")
    p.add_argument("folder")
    p.add_argument("--no-checksums", action="store_true",
                   help="skip the full pass (sha256, label tables vs json): sizes and counts only")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("labels", help="(re)build each shard's label table from its json members (listed in the "
                                      "manifest)")
    p.add_argument("folder")
    p.set_defaults(func=_cmd_labels)

    p = sub.add_parser("index", help="(re)build the DALI-compatible .idx file of WebDataset tars")
    p.add_argument("tars", nargs="+")
    p.set_defaults(func=_cmd_index)


if __name__ == "__main__":  # python -m phenoflow.data.commands data synth ...
    parser = argparse.ArgumentParser(prog="phenoflow")
    register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
