"""User-facing failures: one exception family the CLI turns into a one-paragraph message and an exit code.

`PhenoflowError` is a failure caused by the user's input (a config value, a data file, a checkpoint), not a
bug: its message names the file, row, field or value, and `phenoflow` prints it without a traceback (the
global `--debug` flag shows the traceback too). `exit_code` is the process's exit status for it.
This module imports nothing from phenoflow, so every part of the package can use it without import circles.
"""
from __future__ import annotations


class PhenoflowError(Exception):
    """A user-facing failure; the message names the file, row, field or value concerned."""

    exit_code = 2


class ConfigError(PhenoflowError, ValueError):
    """A bad config value, field, preset or config file; the message names it (re-exported by phenoflow.config)."""


class CheckpointError(PhenoflowError, RuntimeError):
    """A checkpoint or weights file that cannot be read (missing, empty, truncated, foreign, wrong shapes)."""


class NonFiniteError(PhenoflowError, RuntimeError):
    """Training stopped after train.max_nonfinite_steps non-finite steps in a row (its own exit code)."""

    exit_code = 3
