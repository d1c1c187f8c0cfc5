"""Arguments shared by every subcommand that takes a config: --preset/--config, dotted overrides, --dry-run.

Kept apart from phenoflow.cli so that the command modules of the packages (phenoflow.train.commands,
phenoflow.eval.commands, phenoflow.data.commands) use them without importing the console script back.
"""
from __future__ import annotations

import argparse
import os
import sys

from phenoflow.config import PRESETS, Config, dump_yaml, resolve


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    p.add_argument("--preset", default=default_preset, help=f"named preset (default {default_preset}); one of: "
                   + ", ".join(sorted(PRESETS)))
    p.add_argument("--config", default=None, help="a YAML config file (instead of --preset)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=32 eval.guidance=[1,2]")


def config_from_args(args) -> Config:
    """The validated config (ConfigError naming the field, the preset or the --config file)."""
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
