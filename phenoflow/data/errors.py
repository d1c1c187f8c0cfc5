"""Data errors: every failure caused by a data file or a data command's input is a `DataError`.

`DataError` is a `PhenoflowError` (the CLI prints its one-paragraph message and exits with code 2) and a
`ValueError` (code that catches ValueError, e.g. config checks around a shard folder, keeps working). Messages
name the file and the row, shard, key, field or value concerned. This module imports only phenoflow.errors.
"""
from __future__ import annotations

from typing import Any

from phenoflow.errors import PhenoflowError


class DataError(PhenoflowError, ValueError):
    """Bad data or bad input to a data command; the message names the file, row, field or value."""


class ManifestError(DataError):
    """A shard folder's manifest.json is unreadable, of another format or version, or lacks a field."""


class MissingManifestError(ManifestError, FileNotFoundError):
    """A folder has no manifest.json (not a shard folder, or a write that has not finished)."""


class ShardError(DataError):
    """Bad shard data; the message names the shard and the sample key (`data verify`: the first bad one)."""


class MissingShardError(ShardError):
    """A shard, index or label table named by the manifest is absent or unusable: always an error, whatever
    the skip policy (it is not one bad sample)."""


class ChecksumError(ShardError):
    """A sample's image bytes differ from the crc32 its label table recorded when the shard was written (a
    damaged shard, or an index whose offsets do not fit the tar)."""


class ConvertError(DataError):
    """Bad input to a converter. `problems` lists every bad row found (dicts with csv, row, column, value,
    reason); the message lists them too, one line each."""

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


def bad_sample(err: BaseException, policy: str, skipped: list[str], shard: str, key: str) -> None:
    """The loaders' one bad-sample policy, called from an `except (OSError, ShardError)` around one sample.

    An I/O error becomes a ShardError naming the shard and key. policy "error" raises it; "skip" records the
    message in `skipped` (the loader counts and logs it) and returns, so the caller goes on with the next
    sample. A MissingShardError (a whole shard, index or table unusable, not one bad sample) always raises."""
    if isinstance(err, OSError):
        shard_err: ShardError = ShardError(f"shard {shard}, key {key}: reading failed: {err}")
        if policy == "error":
            raise shard_err from err
    elif isinstance(err, ShardError):
        shard_err = err
        if policy == "error" or isinstance(err, MissingShardError):
            raise err
    else:
        raise err
    skipped.append(str(shard_err))
