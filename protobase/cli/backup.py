"""`protobase backup` and `protobase recover`: a consistent copy of a live database, a salvage of a damaged one.

Runs in the process of the command. `backup` asks the running coordinator
(started if none runs) for a checkpoint into a new directory; `recover`
reads a damaged directory, never changing it, through the coordinator's
`salvage` in this process. Invariant: neither writes into an existing
non-empty directory, and each prints what it kept and, for recover, what was
lost and how to go further.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from protobase.cli.command import existing_datadir, open_database
from protobase.cli.output import human_bytes
from protobase.errors import DataDirectoryError

__all__ = ["backup", "recover"]


def backup(args: argparse.Namespace) -> int:
    """`protobase backup PATH DEST`: a hot, consistent backup into the new directory DEST."""
    from protobase.persistence.checkpoint import read_checkpoint

    path = existing_datadir(args.path)
    destination = os.path.abspath(args.destination)
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise DataDirectoryError(
            f"backup destination {destination} exists and is not an empty directory; pass a new directory"
        )
    print(f"backing up {path} to {destination} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    with open_database(path, args, create=False) as db:
        written = db.backup(destination)
    header = read_checkpoint(written)
    size = os.stat(written).st_size
    print(
        f"backup of {path} at seq {header.seq} written to {written} ({human_bytes(size)}, "
        f"{time.monotonic() - started:.2f}s); open it with protobase.open({destination!r}) "
        f"or `protobase status {destination}`"
    )
    return 0


def recover(args: argparse.Namespace) -> int:
    """Salvage into a new directory; print what was kept and what was lost."""
    from protobase.coordinator.recovery import salvage

    report = salvage(
        args.path, args.destination, progress=lambda line: print(f"  {line}", flush=True), past_gaps=args.past_gaps
    )
    past = " (past gaps)" if report.past_gaps else ""
    print(f"recovered {report.records_applied} commits up to seq {report.seq}{past} into {report.destination}")
    for path, start, end in report.damaged_ranges:
        print(f"  unreadable bytes {start}..{end} of {path}")
    for path in report.damaged_checkpoints:
        print(f"  damaged checkpoint {path} was not used")
    if report.past_gaps:
        for first, last, why in report.records_skipped:
            print(f"  skipped WAL record{'s' if last > first else ''} {_lsn_range(first, last)}: {why}")
    elif report.records_skipped:
        first, last, why = report.records_skipped[0]
        print(
            f"LOST: WAL record{'s' if last > first else ''} {_lsn_range(first, last)} ({why}), the commit "
            f"after seq {report.seq}; recovery stopped there, since a later commit may depend on a lost one: "
            f"{report.records_left} intact WAL records after it were not applied. To apply them anyway, run "
            f"`protobase recover --past-gaps {os.path.abspath(args.path)} ANOTHER_NEW_DIR` (it lists every "
            f"record it skips)"
        )
    print(f"open it with protobase.open({report.destination!r}); the damaged directory was not changed")
    return 0


def _lsn_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"
