"""`protobase status`, `stats` and `check`: what serves a data directory, and whether it is sound.

Runs in the process of the command. `status` and `stats` attach to a running
coordinator and never start one (without one, `status` still lists the
files on disk); `check` starts one if none runs, to verify every invariant.
Invariant: none of them changes the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from protobase.cli.command import existing_datadir, open_database
from protobase.cli.output import human_bytes
from protobase.client.stats import DatabaseStats

__all__ = ["status", "stats", "check", "disk_files", "print_disk"]


def disk_files(path: str) -> list[tuple[str, str, int]]:
    """(kind, name, size) of the checkpoint and WAL files of a data directory."""
    from protobase.persistence.checkpoint import checkpoint_files
    from protobase.persistence.wal.files import list_wal_files

    found = []
    for kind, files in (("checkpoint", checkpoint_files(path)), ("wal", list_wal_files(path))):
        for _, file in files:
            try:
                size = os.stat(file).st_size
            except FileNotFoundError:  # removed by the persistence process since we listed it
                continue
            found.append((kind, os.path.basename(file), size))
    return found


def print_disk(path: str) -> None:
    """Print the checkpoint and WAL files of a data directory with their sizes and totals."""
    files = disk_files(path)
    print("on disk:")
    if not files:
        print("  no checkpoint and no WAL file (an empty database)")
    for kind, name, size in files:
        print(f"  {kind:<10} {name}  {human_bytes(size)}")
    total = {kind: sum(size for k, _, size in files if k == kind) for kind in ("checkpoint", "wal")}
    print(f"  total: checkpoints {human_bytes(total['checkpoint'])}, WAL {human_bytes(total['wal'])}")


def status(args: argparse.Namespace) -> int:
    """`protobase status PATH`: what runs, how far the log is durable, memory, readers, commit rate, files."""
    import protobase
    from protobase.errors import CoordinatorError

    path = existing_datadir(args.path)
    try:
        db = protobase.open(path, create=False, start_coordinator=False)
    except CoordinatorError as error:
        if "no coordinator serves" not in str(error):
            raise
        print(f"no coordinator serves {path} (not running)")
        print_disk(path)
        return 0
    with db:
        first = db.stats()
        time.sleep(max(args.interval, 0.0))
        latest = db.stats()
        mine = db.session.slot  # this command's own reader slot
    _print_status(path, first, latest, mine)
    print_disk(path)
    return 0


def _print_status(path: str, first: DatabaseStats, latest: DatabaseStats, mine: int | None) -> None:
    """Print two readings of db.stats() taken a moment apart; `mine` is the reader slot of this command."""
    elapsed = latest.taken_at - first.taken_at
    rate = (latest.commits - first.commits) / elapsed if elapsed > 0 else 0.0
    print(f"database {path}")
    print(f"  coordinator pid {latest.coordinator_pid}, persistence pid {latest.persistence_pid or 'none'}")
    print(
        f"  seq {latest.seq}, {latest.commits} commits and {latest.conflicts} conflicts since it started, "
        f"{latest.compactions} compactions, {latest.checkpoints} checkpoints"
    )
    print(
        f"  WAL: last LSN {latest.last_lsn}, durable LSN {latest.durable_lsn}, "
        f"lag {latest.last_lsn - latest.durable_lsn} records; {latest.wal_syncs} fsyncs; "
        f"{human_bytes(latest.wal_bytes_since_checkpoint)} since the last checkpoint"
    )
    print(
        f"  memory: {latest.segments} segments, {human_bytes(latest.shared_bytes)} shared, "
        f"{human_bytes(latest.data_bytes)} data, {human_bytes(latest.live_bytes)} live, "
        f"{human_bytes(latest.reclaimable_bytes)} reclaimable"
    )
    print(f"  commit rate: {rate:.1f} commits/s (over {elapsed:.2f}s)")
    print(
        f"  coordinator GC: {latest.gc_pauses} collections, longest {latest.gc_longest_pause_ms:.2f} ms, "
        f"{latest.gc_pause_total_ms:.1f} ms in all"
    )
    others = [reader for reader in latest.readers if reader.slot != mine]
    print(f"  readers: {len(others)}" + ("" if others else " (besides this command)"))
    for reader in others:
        held = (
            "no snapshot"
            if reader.snapshot_seq is None
            else f"snapshot seq {reader.snapshot_seq}, {reader.snapshot_age} commits old"
        )
        print(f"    pid {reader.pid} (slot {reader.slot}): {held}")
    oldest = latest.oldest_reader
    if oldest is not None and oldest.slot != mine:
        print(
            f"  oldest snapshot: pid {oldest.pid} (slot {oldest.slot}) has held seq {oldest.snapshot_seq} for "
            f"{oldest.held_seconds:.1f}s, keeping {human_bytes(oldest.retained_bytes)} of retired segments "
            f"in shared memory"
        )
    if latest.compaction_failures:
        print(
            f"  compactions that failed and were undone: {latest.compaction_failures} "
            f"(see the coordinator's log; /dev/shm may be full)"
        )


def stats(args: argparse.Namespace) -> int:
    """`protobase stats PATH`: db.stats() of a running database as JSON."""
    import protobase

    path = existing_datadir(args.path)
    with protobase.open(path, create=False, start_coordinator=False) as db:
        reading = db.stats()
    print(json.dumps(dataclasses.asdict(reading), indent=2))
    return 0


def check(args: argparse.Namespace) -> int:
    """`protobase check PATH`: verify every invariant; "ok: ..." or a CorruptionError (exit 1)."""
    path = existing_datadir(args.path)
    started = time.monotonic()
    with open_database(path, args, create=False) as db:
        db.check()
        reading = db.stats()
        with db.snapshot() as snapshot:
            keys = len(snapshot.root)
    print(
        f"ok: {path} at seq {reading.seq}: every invariant holds ({keys} top-level keys, "
        f"{human_bytes(reading.live_bytes)} live, checked in {time.monotonic() - started:.2f}s)"
    )
    return 0
