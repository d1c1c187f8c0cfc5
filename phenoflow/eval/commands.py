"""`phenoflow evaluate` and `phenoflow sample`: argparse subcommands registered by phenoflow.cli.

    phenoflow evaluate --preset demo --run-dir runs/demo eval.guidance=[1,2,3]
    phenoflow evaluate --preset bbbc021 --splits seen unseen eval.inception_weights=weights/pt_inception.pth
    phenoflow sample --preset demo --run-dir runs/demo --out runs/demo/samples eval.solver=heun eval.steps=20
Both load the run's exported EMA weights (run_dir/export, eval.ema_std) unless told otherwise and use the eval
section of the config (solver, tolerances, guidance strengths, split, features, weights paths).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from phenoflow.cli_args import add_config_args, config_from_args, dry_run
from phenoflow.config import validate
from phenoflow.train.preflight import preflight_eval


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--run-dir", default=None, help="run folder with export/ (default: run.out_dir/run.name)")
    p.add_argument("--mode", choices=("generate", "counterfactual"), default="generate",
                   help="generate from noise, or counterfactual: from control images of the same experiment")
    p.add_argument("--seed", type=int, default=0, help="noise seed (noise is per sample key)")
    p.add_argument("--data-dir", default=None, help="shard folder (default: prepared from the config's data section)")


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
    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    if cfg.data.modality == "expression":
        return _evaluate_expression(cfg, args)
    preflight_eval(cfg, args.splits, args.data_dir)  # before any data or report is written
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = _launch_distributed(cfg)
    try:
        return _evaluate_splits(cfg, args)
    finally:
        _finish_distributed(started)


def _evaluate_splits(cfg, args) -> int:
    from phenoflow.eval.evaluate import evaluate

    if not args.splits:
        report = evaluate(cfg, args.run_dir, report_dir=args.report_dir, mode=args.mode, seed=args.seed,
                          data_dir=args.data_dir)
        if _is_rank0():
            print(f"report: {report / 'metrics.md'}")
        return 0
    # Several splits (e.g. seen and unseen perturbations): one report each, in REPORT_DIR/<split>.
    base = Path(args.report_dir) if args.report_dir else Path(args.run_dir or cfg.run_dir) / "report"
    for split in args.splits:
        cfg = config_from_args(args)
        cfg.eval.split = split
        validate(cfg)
        report = evaluate(cfg, args.run_dir, report_dir=base / split, mode=args.mode, seed=args.seed,
                          data_dir=args.data_dir)
        if _is_rank0():
            print(f"report ({split}): {report / 'metrics.md'}")
    return 0


def _evaluate_expression(cfg, args) -> int:
    """Expression runs (data.modality=expression): h5ad predictions, PerturBench/VCC/distribution metrics."""
    from phenoflow.eval.expression.report import evaluate_expression_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = Path(args.report_dir) if args.report_dir else Path(args.run_dir or cfg.run_dir) / "report"
    for split in args.splits or [None]:
        if split is not None:
            cfg = config_from_args(args)
            cfg.eval.split = split
            validate(cfg)
        report = evaluate_expression_run(cfg, args.run_dir, base / split if split else base, seed=args.seed,
                                         data_dir=args.data_dir, mode=args.mode)
        print(f"report{f' ({split})' if split else ''}: {report / 'metrics.md'}")
    return 0


def cmd_sample(args) -> int:
    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    if cfg.data.modality == "expression":
        from phenoflow.eval.expression.generate import sample_expression

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        out = sample_expression(cfg, args.run_dir, out_dir=args.out, seed=args.seed, data_dir=args.data_dir,
                                mode=args.mode)
        print(f"samples: {out['real'].parent} (real: {out['real'].name}, predictions: "
              + ", ".join(p.name for p in out["pred"].values()) + ")")
        return 0
    preflight_eval(cfg, None, args.data_dir)  # before any data or sample is written
    from phenoflow.eval.evaluate import sample

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = _launch_distributed(cfg)
    try:
        out = sample(cfg, args.run_dir, out_dir=args.out, mode=args.mode, seed=args.seed, data_dir=args.data_dir)
    finally:
        _finish_distributed(started)
    if _is_rank0():
        print(f"samples: {out}")
    return 0


def register(subparsers) -> None:
    """Add the `evaluate` and `sample` subcommands to phenoflow's argparse subparsers."""
    p = subparsers.add_parser("evaluate", help="generate for each guidance strength, score (FD/KD), write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--report-dir", default=None, help="report folder (default: RUN_DIR/report)")
    p.add_argument("--splits", nargs="+", default=None,
                   help="evaluate each of these splits (e.g. seen unseen) into REPORT_DIR/<split>")
    p.set_defaults(func=cmd_evaluate)
    p = subparsers.add_parser("sample", help="generate one image per real image of the eval split and save them",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/samples)")
    p.set_defaults(func=cmd_sample)
