"""The `phenoflow` console script: one entry point, one subcommand per job.

    phenoflow demo                                   synth -> train -> sample -> score -> report (embedded default)
    phenoflow train --preset demo train.batch_size=32 [--dry-run]
    phenoflow data synth|convert|plan ...
    phenoflow sample / evaluate ...
Every command that takes a config accepts --preset NAME or --config FILE.yaml plus dotted overrides.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from phenoflow.config import PRESETS, Config, ConfigError, dump_yaml, resolve


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    p.add_argument("--preset", default=default_preset, help=f"named preset (default {default_preset}); one of: "
                   + ", ".join(sorted(PRESETS)))
    p.add_argument("--config", default=None, help="a YAML config file (instead of --preset)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=32 eval.guidance=[1,2]")


def config_from_args(args) -> Config:
    return resolve(args.preset, args.overrides, config_file=args.config)


def dry_run(cfg: Config, args) -> bool:
    if getattr(args, "dry_run", False):
        sys.stdout.write(dump_yaml(cfg))
        return True
    return False


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    from phenoflow.train.trainer import train

    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/deepspeed, report once
        print(f"export: {out}")
    return 0


def cmd_demo(args) -> int:
    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    from phenoflow.eval.evaluate import evaluate
    from phenoflow.train.trainer import train

    t0 = time.perf_counter()
    print(f"[demo] run folder {cfg.run_dir}: synthetic data, training {cfg.train.total_samples} samples")
    train(cfg)
    t1 = time.perf_counter()
    report = evaluate(cfg, cfg.run_dir)
    t2 = time.perf_counter()
    print(f"[demo] trained in {t1 - t0:.0f}s, evaluated in {t2 - t1:.0f}s")
    print(f"[demo] report: {report / 'metrics.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phenoflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on embedded synthetic data (a few minutes on CPU)")
    add_config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train or resume (rerun the same command to resume)")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    # Subcommands owned by their packages.
    from phenoflow.data import commands as data_commands
    from phenoflow.eval import commands as eval_commands
    from phenoflow.train import commands as train_commands

    data_commands.register(sub)
    eval_commands.register(sub)
    train_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"phenoflow: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
