"""Arguments shared by every subcommand that takes a config: --preset/--config, dotted overrides, --dry-run,
--run-dir; and the help formatting and parsing rules of every `phenoflow` (sub)command.

Kept apart from phenoflow.cli so that the command modules of the packages (phenoflow.train.commands,
phenoflow.eval.commands, phenoflow.data.commands) use them without importing the console script back.

A command given a run folder (--run-dir RUN) or an export folder takes that run's saved config (RUN/config.yaml
or the export's model.json) as its base unless --preset or --config is given; dotted overrides apply on top, and a
conflict with what the run's checkpoint needs is an error before any work (phenoflow/run_config.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from phenoflow.config import PRESETS, Config, dump_yaml, resolve


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (line breaks kept); each option's default appended as "(default: X)" unless the
    help already states it or there is none worth showing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or (isinstance(default, list) and not default)
                or (not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def user_parser_rules(parser: argparse.ArgumentParser) -> None:
    """For a parser and all its subparsers: no abbreviated long options (`--split` must not silently mean
    `--splits`) and the HelpFormatter (defaults shown)."""
    parser.allow_abbrev = False
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                user_parser_rules(sub)


class _Preset(argparse.Action):
    """--preset NAME, remembering that it was given (a run folder's own config is the base otherwise)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.preset_given = True


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "demo", run_dir: str = "") -> None:
    """--preset/--config/--dry-run and the overrides; with run_dir (its help text) also --run-dir RUN."""
    p.add_argument("--preset", default=default_preset, action=_Preset, metavar="NAME",
                   help=f"named preset (default: {default_preset}"
                   + (", or the run's own config when --run-dir is given" if run_dir else "")
                   + "); one of: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="a YAML config file (instead of --preset)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    if run_dir:
        p.add_argument("--run-dir", default=None, metavar="RUN", help=run_dir)
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="dotted config overrides, e.g. train.batch_size=32 eval.guidance=[1,2]")
    p.set_defaults(preset_given=False)


def explicit_base(args) -> bool:
    """True when the command line names a config base (--preset or --config)."""
    return bool(getattr(args, "preset_given", False) or getattr(args, "config", None))


def config_from_args(args) -> Config:
    """The validated config (ConfigError naming the field, the preset or the --config file). With --run-dir: the
    run's saved config (or the explicit --preset/--config) + overrides, located in that folder and checked against
    its checkpoint (phenoflow.run_config.config_for_run)."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir:
        from phenoflow.run_config import config_for_run, find_run

        ref = find_run(run_dir)
        base = resolve(args.preset, [], config_file=args.config) if explicit_base(args) else None
        return config_for_run(ref, args.overrides, base=base)
    return resolve(args.preset, args.overrides, config_file=args.config)


def dry_run(cfg: Config, args) -> bool:
    if getattr(args, "dry_run", False):
        sys.stdout.write(dump_yaml(cfg))
        return True
    return False


def launch_world_size() -> int:
    """The number of training processes this command runs in (WORLD_SIZE under torchrun/deepspeed, else 1)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
