"""`phenoflow evaluate` and `phenoflow sample`: argparse subcommands registered by phenoflow.cli."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from phenoflow.cli_args import add_config_args, config_from_args, dry_run
from phenoflow.config import validate
from phenoflow.train.preflight import preflight_eval

EVALUATE_HELP = """\
Generate images (or cells) for the evaluation split of a trained run, score them against the real ones
(FD/KD on morphology, Inception or DINOv2 features; PerturBench/VCC metrics for expression) for each guidance
strength in eval.guidance, and write a report (metrics.md, metrics.json, grids, samples).

Give the run folder: its saved config (RUN/config.yaml), vocabularies and exported weights are used; dotted
overrides apply on top, and one that conflicts with the checkpoint (model shape, channels, modality) is refused
before any work. The data's labels are compared with the model's by name.

examples:
  phenoflow evaluate --run-dir runs/demo
  phenoflow evaluate --run-dir runs/rxrx1 eval.guidance=[1,2,3] eval.features=[morphology,inception]
  phenoflow evaluate --run-dir runs/bbbc021 --splits seen unseen
  phenoflow evaluate --run-dir runs/rxrx1 --data-dir shards/rxrx1-test --split test
"""

SAMPLE_HELP = """\
Generate from a trained run. With --perturbation (and optionally --experiment, --cell-type, -n): N images of
that condition, labels by name, saved to OUT/<perturbation>_w<w>.npz with a grid PNG. Without: one image per
real image of the evaluation split, with the same labels (OUT/w<w>.npz, labels stored as ids and names).

Give the run folder: its saved config, vocabularies and exported weights are used; overrides apply on top.

examples:
  phenoflow sample --run-dir runs/demo --perturbation gene_01 --experiment exp_02 -n 16 eval.guidance=[2]
  phenoflow sample --run-dir runs/demo --out runs/demo/samples eval.solver=heun eval.steps=20
"""

RUN_DIR_HELP = ("the run folder (runs/NAME) or an export folder; its saved config is the base unless --preset/"
                "--config is given (default without it: run.out_dir/run.name of the preset)")


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p, run_dir=RUN_DIR_HELP)
    p.add_argument("--mode", choices=("generate", "counterfactual", "control"), default="generate",
                   help="generate: from noise; counterfactual: a control image of the same experiment inverted "
                        "to noise, then forward with the target labels; control (Config A, runs trained with "
                        "flow.coupling=control): from a control image of the same experiment + flow.control_noise "
                        "x noise")
    p.add_argument("--seed", type=int, default=0, help="noise seed (noise is per sample key)")
    p.add_argument("--data-dir", default=None, metavar="SHARDS",
                   help="shard folder to evaluate on (default: the run's data, from its config's data section)")
    p.add_argument("--split", default=None, help="the split to generate for (sets eval.split)")


def _config(args):
    cfg = config_from_args(args)
    if getattr(args, "split", None):
        cfg.eval.split = args.split
        validate(cfg)
    if not args.run_dir:  # the preset's run folder: the same check against its checkpoint as with --run-dir
        from phenoflow.run_config import (
            RunFolderError,
            check_against_checkpoint,
            find_run,
        )

        try:
            ref = find_run(cfg.run_dir)
        except RunFolderError:
            return cfg
        check_against_checkpoint(cfg, ref)
    return cfg


def _run_dir(cfg, args) -> Path:
    """The run folder: --run-dir (config_from_args located cfg there) or the preset's run.out_dir/run.name."""
    return cfg.run_dir


def check_run(cfg, args) -> None:
    """Before any work: the run's labels against the data's, by name, where the data's manifest exists already
    (shards; a run's own synthetic data). Synthetic data written later comes from the same config."""
    from phenoflow.run_config import RunFolderError, find_run, label_remap, run_vocabs

    try:
        ref = find_run(_run_dir(cfg, args))
    except RunFolderError:
        return  # evaluate()/sample() name the missing export
    data = Path(args.data_dir) if args.data_dir else (Path(cfg.data.shards) if cfg.data.source == "shards"
                                                      else ref.home / "data")
    if (data / "manifest.json").is_file():
        from phenoflow.data.shards import load_manifest
        from phenoflow.errors import ConfigError

        manifest = load_manifest(data)
        shape = manifest.get("image_shape")
        d = cfg.data
        if d.modality == "microscopy" and shape and tuple(shape) != (d.image_size, d.image_size, d.channels):
            h, w, c = shape
            raise ConfigError(f"the data in {data} hold {h}x{w} {c}-channel images, but the model in {ref.path} "
                              f"takes {d.image_size}x{d.image_size} {d.channels}-channel images")
        label_remap(run_vocabs(ref), manifest.get("vocabs", {}), f"the data in {data}")


def _launch_distributed(cfg) -> bool:
    """Under torchrun (WORLD_SIZE > 1), start the process group the way training does; True if started here."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    from phenoflow.train.engines import init_distributed

    init_distributed(cfg)  # nccl on GPU (device set from LOCAL_RANK), gloo on CPU
    return True


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _finish_distributed(started: bool) -> None:
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()


def cmd_evaluate(args) -> int:
    cfg = _config(args)
    if dry_run(cfg, args):
        return 0
    check_run(cfg, args)
    if cfg.data.modality == "expression":
        return _evaluate_expression(cfg, args)
    preflight_eval(cfg, args.splits, args.data_dir)  # before any data or report is written
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = _launch_distributed(cfg)
    try:
        return _evaluate_splits(cfg, args)
    finally:
        _finish_distributed(started)


def _split_configs(cfg, args):
    """(split or None, config) for each split to evaluate."""
    if not args.splits:
        return [(None, cfg)]
    out = []
    for split in args.splits:
        c = _config(args)
        c.eval.split = split
        out.append((split, validate(c)))
    return out


def _evaluate_splits(cfg, args) -> int:
    from phenoflow.eval.evaluate import evaluate

    run_dir = _run_dir(cfg, args)
    # Several splits (e.g. seen and unseen perturbations): one report each, in REPORT_DIR/<split>.
    base = Path(args.report_dir) if args.report_dir else run_dir / "report"
    for split, c in _split_configs(cfg, args):
        if getattr(args, "ema_sweep", None):  # guidance x EMA-width sweep (phenoflow/eval/sweep.py)
            from phenoflow.eval.sweep import sweep

            out = sweep(c, run_dir, args.ema_sweep, report_dir=(base / split) if split else args.report_dir,
                        mode=args.mode, seed=args.seed, data_dir=args.data_dir)
            if _is_rank0():
                print(f"sweep{f' ({split})' if split else ''}: {out / 'sweep.md'}")
            continue
        report = evaluate(c, run_dir, report_dir=base / split if split else args.report_dir, mode=args.mode,
                          seed=args.seed, data_dir=args.data_dir)
        if _is_rank0():
            from phenoflow.eval.sweep import report_to_tensorboard

            report_to_tensorboard(run_dir, report, prefix=f"eval/{split}" if split else "eval")  # run_dir/tensorboard
            print(f"report{f' ({split})' if split else ''}: {report / 'metrics.md'} (as a web page: "
                  f"{report / 'index.html'})")
    return 0


def _evaluate_expression(cfg, args) -> int:
    """Expression runs (data.modality=expression): h5ad predictions, PerturBench/VCC/distribution metrics."""
    from phenoflow.eval.expression.report import evaluate_expression_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = _run_dir(cfg, args)
    base = Path(args.report_dir) if args.report_dir else run_dir / "report"
    for split, c in _split_configs(cfg, args):
        report = evaluate_expression_run(c, run_dir, base / split if split else base, seed=args.seed,
                                         data_dir=args.data_dir, mode=args.mode)
        print(f"report{f' ({split})' if split else ''}: {report / 'metrics.md'}")
    return 0


def cmd_sample(args) -> int:
    cfg = _config(args)
    if dry_run(cfg, args):
        return 0
    if args.perturbation is not None or args.num is not None:
        if args.mode != "generate" or args.data_dir:
            from phenoflow.errors import ConfigError

            raise ConfigError("--perturbation/-n generate from noise without data; --mode counterfactual/control and "
                              "--data-dir work on the real images of a split (drop --perturbation/-n), or use "
                              "phenoflow.load(RUN).counterfactual(images, perturbation=...) from Python")
        for path in sample_labels(cfg, args):
            print(f"samples: {path}")
        return 0
    check_run(cfg, args)
    run_dir = _run_dir(cfg, args)
    if cfg.data.modality == "expression":
        from phenoflow.eval.expression.generate import sample_expression

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        out = sample_expression(cfg, run_dir, out_dir=args.out, seed=args.seed, data_dir=args.data_dir,
                                mode=args.mode)
        print(f"samples: {out['real'].parent} (real: {out['real'].name}, predictions: "
              + ", ".join(p.name for p in out["pred"].values()) + ")")
        return 0
    preflight_eval(cfg, None, args.data_dir)  # before any data or sample is written
    from phenoflow.eval.evaluate import sample

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = _launch_distributed(cfg)
    try:
        out = sample(cfg, run_dir, out_dir=args.out, mode=args.mode, seed=args.seed, data_dir=args.data_dir)
    finally:
        _finish_distributed(started)
    if _is_rank0():
        print(f"samples: {out}")
    return 0


def sample_labels(cfg, args) -> list[Path]:
    """`phenoflow sample --perturbation NAME [-n N]`: N samples of one condition per w in eval.guidance, through
    the Python API (phenoflow.api). Microscopy: OUT/<name>_w<w>.npz (images uint8 (N, C, H, W) as in the other
    samples files, label ids and `<group>_name` names) and a grid PNG; expression: OUT/<name>_w<w>.h5ad."""
    import numpy as np
    import torch

    from phenoflow.api import load
    from phenoflow.eval.generate import save_samples

    n = 16 if args.num is None else args.num
    model = load(cfg.run_dir, ema_std=cfg.eval.ema_std, device="cpu" if cfg.train.device == "cpu" else None)
    model.config = cfg  # the run's config with this command's overrides (solver, steps, guidance groups)
    names = {"experiment": args.experiment, "cell_type": args.cell_type}
    names = {k: v for k, v in names.items() if v is not None}
    out_dir = Path(args.out) if args.out else cfg.run_dir / "samples"
    stem = (args.perturbation or "null").replace("/", "_").replace("+", "_")
    paths = []
    for w in cfg.eval.guidance:
        x = model.sample(perturbation=args.perturbation, n=n, guidance=w, seed=args.seed,
                         as_anndata=cfg.data.modality == "expression", **names)
        path = out_dir / f"{stem}_w{w:g}"
        if cfg.data.modality == "expression":
            out_dir.mkdir(parents=True, exist_ok=True)
            x.uns["phenoflow"] = {"w": float(w), "seed": args.seed, "run": str(cfg.run_dir)}
            x.write_h5ad(path.with_suffix(".h5ad"))
            paths.append(path.with_suffix(".h5ad"))
            continue
        from phenoflow.eval.grids import save_grid

        images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        labels = {g: v[:, 0] if v.ndim > 1 else v for g, v in model.labels(n, args.perturbation, **names).items()}
        labels["key"] = [f"{stem}_{i}" for i in range(n)]
        paths.append(save_samples(path.with_suffix(".npz"), images, labels, names=model.vocabs, w=w, seed=args.seed))
        save_grid({args.perturbation or "null": (images[:0], images[:8])}, path.with_suffix(".png"), k=8,
                  title=f"w = {w:g}")
    return paths


def register(subparsers) -> None:
    """Add the `evaluate` and `sample` subcommands to phenoflow's argparse subparsers."""
    p = subparsers.add_parser("evaluate", help="generate for each guidance strength, score (FD/KD), write a report",
                              description=EVALUATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--report-dir", default=None, help="report folder (default: RUN_DIR/report)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="evaluate each of these splits (e.g. seen unseen) into REPORT_DIR/<split>")
    p.add_argument("--ema-sweep", default=None, metavar="STD,STD,...",
                   type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                   help="evaluate every eval.guidance at each of these EMA widths, e.g. 0,0.01,0.03,0.05 (0 = raw "
                        "weights; widths the run did not track are reconstructed post hoc from its snapshots) into "
                        "RUN_DIR/report/sweep (default: off)")
    p.set_defaults(func=cmd_evaluate)
    p = subparsers.add_parser("sample", help="generate images of chosen labels, or one per real image, and save them",
                              description=SAMPLE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/samples)")
    p.add_argument("--perturbation", default=None, metavar="NAME",
                   help="generate N samples of this perturbation (a name of the run's vocabulary; 'A+B' for an "
                   "expression combination) instead of one per real image")
    p.add_argument("--experiment", default=None, metavar="NAME", help="experiment (batch) name for --perturbation")
    p.add_argument("--cell-type", default=None, metavar="NAME", help="cell type name for --perturbation")
    p.add_argument("-n", "--num", type=int, default=None, metavar="N",
                   help="how many samples of the chosen labels (default 16)")
    p.set_defaults(func=cmd_sample)
