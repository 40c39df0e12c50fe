"""What every `protobase` command shares: its error, and how it finds and opens a data directory.

Runs in the process of the `protobase` command. Invariant: a read-only
command never creates or stamps a directory (`existing_datadir` checks
before anything opens it), and a coordinator a command starts lingers only
`--grace` seconds after the command ends.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from protobase.database import Database
from protobase.errors import DataDirectoryError

__all__ = ["CommandError", "DEFAULT_GRACE", "existing_datadir", "open_database"]

DEFAULT_GRACE = 2.0  # seconds a coordinator started by a command lingers after it


class CommandError(Exception):
    """A failure of a command that is the user's to fix: printed as one line."""


def existing_datadir(path: str) -> str:
    """The absolute path of an existing ProtoBase data directory; DataDirectoryError otherwise.

    Checked before opening, so that a read-only command never creates or
    stamps a directory.
    """
    from protobase.core.datadir import STAMP, DataDir

    path = os.path.abspath(path)
    if not os.path.lexists(path):
        raise DataDirectoryError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise DataDirectoryError(f"{path} is not a directory")
    if not os.path.exists(os.path.join(path, STAMP)):
        raise DataDirectoryError(f"{path} is not a ProtoBase data directory (it has no {STAMP} stamp)")
    return DataDir.open(path, create=False).path  # owner, mode and format version


def open_database(path: str, args: argparse.Namespace, **options: Any) -> Database:
    """`protobase.open(path, **options)` with the command's `--grace` (a coordinator it starts lingers that long)."""
    import protobase

    return protobase.open(path, shutdown_grace=getattr(args, "grace", DEFAULT_GRACE), **options)
