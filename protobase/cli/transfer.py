"""`protobase dump` and `protobase load`: a database's root to dump lines and back.

Owns the streaming of a snapshot into the dump format (see `dumpformat`) and
the batched commits that load one. Runs in the process of the command,
through an ordinary database handle.

Dump streams: containers are written element by element from the snapshot,
so a tree of millions of entries never becomes one string, and a dump to a
file appears only once complete (written aside, then renamed). Load commits
batches of top-level keys; a collection larger than one batch is loaded over
several transactions (a dict key by key, a set or list in chunks), then its
indexes are created.

Invariant: a load into a missing or empty directory builds the database in a
staging directory beside it and renames it into place only once complete and
its coordinator stopped; a failed load leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO, TypeVar

from protobase.cli.command import CommandError, existing_datadir, open_database
from protobase.cli.dumpformat import IndexFields, UnsupportedValue, read_line, write_line
from protobase.cli.output import Progress
from protobase.database import Database

__all__ = ["LOAD_BATCH_ITEMS", "LOAD_BATCH_BYTES", "STAGING_STOP_TIMEOUT", "dump_lines", "dump", "load"]

LOAD_BATCH_ITEMS = 5_000  # top-level keys, or elements of one big collection, per load transaction
LOAD_BATCH_BYTES = 8 << 20  # bytes of dump text per load transaction
STAGING_STOP_TIMEOUT = 300.0  # seconds (after the grace) for a loaded copy's final checkpoint and stop

_T = TypeVar("_T")


# -- dump ---------------------------------------------------------------------------------


def dump_lines(root: Mapping[Any, Any], out: TextIO, progress: Progress | None = None) -> int:
    """Write the dump of `root` to `out`; return the number of lines."""
    lines = 0
    for key, value in root.items():
        try:
            write_line(key, value, out.write)
        except UnsupportedValue as error:
            raise CommandError(error.describe(f"root[{key!r}]")) from None
        lines += 1
        if progress is not None:
            progress.add(1, "top-level keys")
    return lines


def dump(args: argparse.Namespace) -> int:
    """`protobase dump PATH [--output FILE]`: the root as dump lines, to stdout or atomically to FILE."""
    path = existing_datadir(args.path)
    progress = Progress(f"dump {path}")
    with open_database(path, args, create=False) as db, db.snapshot() as snapshot:
        if args.output in (None, "-"):
            dump_lines(snapshot.root, sys.stdout, progress)
            sys.stdout.flush()
            target = "stdout"
        else:
            target = os.path.abspath(args.output)
            temporary = f"{target}.{os.getpid()}.tmp"
            try:
                with open(temporary, "w", encoding="utf-8") as out:
                    dump_lines(snapshot.root, out, progress)
                os.replace(temporary, target)
            except BaseException:
                if os.path.exists(temporary):
                    os.unlink(temporary)
                raise
        seq = snapshot.seq
    progress.done(f"top-level keys written to {target} (seq {seq})")
    return 0


# -- load --------------------------------------------------------------------------------


def _read_dump(file: TextIO, name: str) -> Iterator[tuple[int, Any, Any, list[IndexFields], int]]:
    """(line number, key, value, indexes, size) of every line of a dump."""
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            key, value, indexes = read_line(line)
        except ValueError as error:
            raise CommandError(f"{name} line {number} is not a dump line: {error}") from None
        yield number, key, value, indexes, len(line)


def _chunks(items: list[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _load_big(db: Database, key: Any, value: Any, progress: Progress) -> None:
    """Load one collection larger than a batch over several transactions."""
    if isinstance(value, dict):
        items = list(value.items())
        with db.transaction() as tx:
            tx.root[key] = dict(items[:LOAD_BATCH_ITEMS])
        progress.add(0, f"lines, {key!r}: {min(len(items), LOAD_BATCH_ITEMS):,}/{len(items):,}")
        for start in range(LOAD_BATCH_ITEMS, len(items), LOAD_BATCH_ITEMS):
            with db.transaction() as tx:
                target = tx.root[key]
                for item_key, item in items[start : start + LOAD_BATCH_ITEMS]:
                    target[item_key] = item
            progress.add(0, f"lines, {key!r}: {min(len(items), start + LOAD_BATCH_ITEMS):,}/{len(items):,}")
        return
    elements = list(value)
    first = elements[:LOAD_BATCH_ITEMS]
    with db.transaction() as tx:
        tx.root[key] = set(first) if isinstance(value, set) else first
    for chunk in _chunks(elements[LOAD_BATCH_ITEMS:], LOAD_BATCH_ITEMS):
        with db.transaction() as tx:
            target = tx.root[key]
            if isinstance(value, set):
                for element in chunk:
                    target.add(element)
            else:
                target.extend(chunk)
        progress.add(0, f"lines, {key!r}: elements loaded in chunks")


def _create_indexes(db: Database, key: Any, indexes: list[IndexFields]) -> None:
    if not indexes:
        return
    with db.transaction() as tx:
        for path, fields in indexes:
            target = tx.root[key]
            for step in path:
                target = target[step]
            for field in fields:
                target.create_index(field)


def load(args: argparse.Namespace) -> int:
    """Commit the lines of a dump; a new database is built aside and appears only once complete.

    A load into a missing or empty directory goes into a staging directory
    beside it, renamed into place once its coordinator has stopped: a load
    that fails (a bad line, Ctrl-C, a full disk) leaves nothing behind. A load
    into an existing database commits batch by batch into it.
    """
    name = "stdin" if args.file == "-" else os.path.abspath(args.file)
    source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    target = os.path.abspath(args.path)
    staging = f"{target}.loading-{os.getpid()}" if _holds_no_database(target) else None
    created = _missing_ancestors(target)  # made for the staging directory: removed again if the load fails
    progress = Progress(f"load {name}")
    try:
        with source, open_database(staging or target, args) as db:
            _commit_lines(db, source, name, progress)
            seq = db.stats().seq
    except BaseException:
        if staging is not None:
            _discard_staging(staging, created, args.grace)
        raise
    finally:
        if source is not sys.stdin:
            source.close()
    if staging is not None:
        _move_into_place(staging, target, args.grace)
    progress.done(f"lines loaded into {target} (now at seq {seq})")
    return 0


def _commit_lines(db: Database, source: TextIO, name: str, progress: Progress) -> None:
    """Commit the dump lines of `source` in batches of LOAD_BATCH_ITEMS keys or LOAD_BATCH_BYTES bytes."""
    batch: list[tuple[Any, Any, list[IndexFields]]] = []
    batch_bytes = 0

    def commit() -> None:
        nonlocal batch, batch_bytes
        if batch:
            with db.transaction() as tx:
                for key, value, _ in batch:
                    tx.root[key] = value
            for key, _, indexes in batch:
                _create_indexes(db, key, indexes)
            progress.add(len(batch), "lines committed")
        batch, batch_bytes = [], 0

    for _, key, value, indexes, size in _read_dump(source, name):
        big = isinstance(value, (dict, set, list)) and len(value) > LOAD_BATCH_ITEMS
        if big or size > LOAD_BATCH_BYTES:
            commit()
            if big:
                _load_big(db, key, value, progress)
                _create_indexes(db, key, indexes)
                progress.add(1, "lines committed")
            else:
                batch = [(key, value, indexes)]
                commit()
            continue
        batch.append((key, value, indexes))
        batch_bytes += size
        if len(batch) >= LOAD_BATCH_ITEMS or batch_bytes >= LOAD_BATCH_BYTES:
            commit()
    commit()


def _holds_no_database(path: str) -> bool:
    """True for a path a load creates the database at: missing, or an empty directory."""
    return not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path))


def _move_into_place(staging: str, target: str, grace: float) -> None:
    """Rename a loaded staging directory to `target` once its coordinator has stopped."""
    from protobase.core.datadir import DataDir
    from protobase.persistence.wal.files import fsync_directory

    if not DataDir(staging).wait_until_unserved(grace + STAGING_STOP_TIMEOUT):
        raise CommandError(
            f"the load is complete in {staging}, but its coordinator has not stopped after "
            f"{grace + STAGING_STOP_TIMEOUT:.0f}s; once it has, rename {staging} to {target}"
        )
    try:
        os.rename(staging, target)  # replaces an empty directory
    except OSError as error:
        raise CommandError(
            f"the load is complete in {staging}, but it cannot be renamed to {target} "
            f"({error.strerror}); rename it yourself"
        ) from None
    fsync_directory(os.path.dirname(target))


def _missing_ancestors(path: str) -> list[str]:
    """The directories above `path` that do not exist yet, deepest first."""
    missing = []
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def _discard_staging(staging: str, created: list[str], grace: float) -> None:
    """Remove what a failed load made (its staging directory and its parents), once its coordinator has stopped."""
    import shutil

    from protobase.core.datadir import DataDir

    if os.path.isdir(staging) and DataDir(staging).wait_until_unserved(grace + STAGING_STOP_TIMEOUT):
        shutil.rmtree(staging, ignore_errors=True)
    if os.path.lexists(staging):
        print(f"protobase: the partial load in {staging} could not be removed; remove it", file=sys.stderr)
        return
    for directory in created:
        try:
            os.rmdir(directory)  # only if still empty: someone else may have put something there
        except OSError:
            return
