"""The `phenoflow` console script: one entry point, one subcommand per job.

    phenoflow demo                                   synth -> train -> sample -> score -> report (embedded default)
    phenoflow demo --modality expression             the same for single-cell expression (preset expression-demo)
    phenoflow train --preset demo train.batch_size=32 [--dry-run]
    phenoflow train --run-dir runs/demo [train.total_samples=...]     resume a run with its saved config
    phenoflow evaluate --run-dir runs/demo           score a run (its own config, vocabularies and weights)
    phenoflow sample --run-dir runs/demo --perturbation gene_01 -n 16
    phenoflow data synth|convert|plan ...
    phenoflow weights import inception|dinov2 FILE    feature-network weights for evaluation (docs/eval.md)
Every command that takes a config accepts --preset NAME or --config FILE.yaml plus dotted overrides
(section.field=value); given a run folder (--run-dir) it takes the run's saved config instead.
Also runs as `python -m phenoflow`.

Exit codes: 0 done; 2 a user-facing failure (bad config or config file, data, checkpoint or weights file: one
paragraph naming the file, row, field or value); 3 training stopped on non-finite steps (a diagnostic
checkpoint is written). `phenoflow --debug ...` (or --debug after the subcommand, or PHENOFLOW_DEBUG=1) also
prints the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from phenoflow.cli_args import (
    HelpFormatter,
    add_config_args,
    config_from_args,
    dry_run,
    explicit_base,
    launch_world_size,
    user_parser_rules,
)
from phenoflow.errors import ConfigError, PhenoflowError

__all__ = ["add_config_args", "build_parser", "config_from_args", "dry_run", "main"]


def train_config(args):
    """The config of `phenoflow train`: with --run-dir and no --preset/--config, the run's saved config (a
    resume); with train.init_from=SOURCE and no --preset/--config, the source run's config (a finetune into a new
    run.name); else the preset/config file. Overrides apply on top; a resume may change only the allowed fields
    (phenoflow.run_config.check_resume), checked here before anything is written."""
    from phenoflow.config import parse_overrides, resolve, update, validate
    from phenoflow.errors import ConfigError
    from phenoflow.run_config import (
        RunFolderError,
        check_resume,
        config_for_run,
        find_run,
        saved_config,
        set_location,
    )

    base = explicit_base(args)
    if args.run_dir:
        folder = Path(args.run_dir)
        if (folder / "config.yaml").is_file():
            ref = find_run(folder)
            cfg = config_for_run(ref, args.overrides, base=resolve(args.preset, [], args.config) if base else None,
                                 check=False)
        elif base:
            cfg = resolve(args.preset, args.overrides, config_file=args.config)
            validate(set_location(cfg, folder))
        else:
            raise RunFolderError(f"--run-dir {folder}: no run to resume there (no {folder / 'config.yaml'}); to start "
                                 f"a new run in it, also give --preset NAME or --config FILE.yaml")
    else:
        source = parse_overrides(args.overrides).get("train", {}).get("init_from")
        cfg = None
        if source and not base:
            try:
                ref = find_run(source)
            except RunFolderError:
                ref = None  # a latest.pt file: the preset is the base, as before
            if ref is not None:
                cfg = validate(update(saved_config(ref), parse_overrides(args.overrides)))
                if ref.run_dir is not None and cfg.run_dir.resolve() == ref.run_dir.resolve():
                    raise ConfigError(f"train.init_from={source}: the new run would be written into the source run "
                                      f"folder {ref.run_dir}; give the finetuned run its own run.name=NAME")
        if cfg is None:
            cfg = resolve(args.preset, args.overrides, config_file=args.config)
    check_resume(cfg, quiet=bool(getattr(args, "dry_run", False)))
    return cfg


def cmd_train(args) -> int:
    cfg = train_config(args)
    if dry_run(cfg, args):
        return 0
    from phenoflow.train.preflight import preflight

    preflight(cfg, world_size=launch_world_size())  # before anything is written
    from phenoflow.train.trainer import train

    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun/deepspeed, report once
        print(f"export: {out}")
    return 0


TRAIN_HELP = """\
Train a run, or resume one. Time is counted in samples seen; checkpoints, vocabularies and the resolved config
are kept in the run folder (run.out_dir/run.name), so the folder is all a later command needs.

examples:
  phenoflow train --preset demo run.name=mine train.total_samples=200000
  phenoflow train --run-dir runs/mine                            resume with the saved config
  phenoflow train --run-dir runs/mine train.total_samples=400000  resume and train longer
  phenoflow train train.init_from=runs/mine run.name=ft data.source=shards data.shards=shards/new
                                                                 finetune a new run from runs/mine (its config)
"""

DEMO_PRESETS = {"microscopy": "demo", "expression": "expression-demo"}


def cmd_demo(args) -> int:
    if args.modality and args.preset == "demo":  # --modality picks the modality's demo preset
        args.preset = DEMO_PRESETS[args.modality]
    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    from phenoflow.run_config import check_resume

    check_resume(cfg)  # a rerun of a demo resumes it: only the allowed fields may change
    expression = cfg.data.modality == "expression"
    if not expression:  # expression data and splits are checked when the run's data is prepared
        from phenoflow.train.preflight import preflight

        preflight(cfg, world_size=1, evaluate=True)  # before anything is written
    from phenoflow.train.trainer import train

    t0 = time.perf_counter()
    print(f"[demo] run folder {cfg.run_dir}: synthetic data, training {cfg.train.total_samples} samples")
    train(cfg)
    t1 = time.perf_counter()
    if expression:
        from phenoflow.eval.expression.report import evaluate_expression_run

        report = evaluate_expression_run(cfg, cfg.run_dir)
    else:
        from phenoflow.eval.evaluate import evaluate

        report = evaluate(cfg, cfg.run_dir)
    t2 = time.perf_counter()
    print(f"[demo] trained in {t1 - t0:.0f}s, evaluated in {t2 - t1:.0f}s")
    page = report / "index.html"  # the image report's page (the expression report is markdown and CSV)
    print(f"[demo] report: {report / 'metrics.md'}" + (f" (as a web page: {page})" if page.is_file() else ""))
    return 0


DEBUG_HELP = "on a failure, also print the Python traceback (also: PHENOFLOW_DEBUG=1)"


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --debug after any (sub)command too. SUPPRESS as default: a subparser that is not given the flag
    leaves the top-level value alone."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--debug" in a.option_strings for a in sub._actions):
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _add_debug_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phenoflow", description=__doc__, formatter_class=HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on embedded synthetic data (a few minutes on CPU)")
    add_config_args(p)
    p.add_argument("--modality", choices=sorted(DEMO_PRESETS), default=None,
                   help="expression: synthetic single-cell counts (preset expression-demo) instead of images")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train, or resume a run (--run-dir RUN, or rerun the same command)",
                       description=TRAIN_HELP)
    add_config_args(p, run_dir="the run folder: resume the run there with its saved config.yaml (overrides on "
                    "top: train.total_samples, intervals, eval.*, engine and device may change; others are refused "
                    "before anything is written); with --preset/--config, a new run in that folder")
    p.set_defaults(func=cmd_train)

    # Subcommands owned by their packages.
    from phenoflow.data import commands as data_commands
    from phenoflow.eval import commands as eval_commands
    from phenoflow.eval import weights_commands
    from phenoflow.study import commands as study_commands
    from phenoflow.train import commands as train_commands

    data_commands.register(sub)
    eval_commands.register(sub)
    train_commands.register(sub)
    weights_commands.register(sub)
    study_commands.register(sub)
    _add_debug_everywhere(parser)
    user_parser_rules(parser)  # no abbreviated options (--split is not --splits), defaults shown in --help
    return parser


def exit_code_for(e: BaseException) -> int | None:
    """The exit status for a user-facing failure, None for anything else (a bug: its traceback is shown)."""
    if isinstance(e, PhenoflowError):
        return e.exit_code
    trainer = sys.modules.get("phenoflow.train.trainer")  # its NonFiniteError, if not yet a PhenoflowError
    if trainer is not None and isinstance(e, getattr(trainer, "NonFiniteError", ())):
        return 3
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return 2  # a named input file that is missing or unreadable
    vocab = sys.modules.get("phenoflow.data.vocab")  # an unknown label name (UnknownLabelError names it)
    if vocab is not None and isinstance(e, getattr(vocab, "UnknownLabelError", ())):
        return 2
    return None


def error_message(e: BaseException, code: int) -> str:
    """One paragraph: the error's own message, which names the file, row, field or value."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, ConfigError):
        return f"phenoflow: config error: {text}"
    if code == 3:
        return f"phenoflow: training stopped: {text}"
    return f"phenoflow: error: {text}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("PHENOFLOW_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except Exception as e:
        code = exit_code_for(e)
        if code is None:
            raise
        if debug:
            traceback.print_exc()
        hint = "" if debug or isinstance(e, ConfigError) else " (rerun with --debug for the traceback)"
        print(error_message(e, code) + hint, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
