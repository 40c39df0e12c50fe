"""The `protobase` command line (also `python -m protobase`).

Commands:

    serve PATH              run the coordinator of PATH in the foreground
    status PATH             what runs, how far the log is durable, memory, readers, commit rate, files
    stats PATH              db.stats() as JSON
    check PATH              verify every invariant (exit 0 "ok: ...", exit 1 on corruption)
    dump PATH [--output F]  the root as JSON lines, one per top-level key
    load PATH FILE          commit the lines of a dump (into an existing database, or a new one
                            that appears only once complete)
    backup PATH DEST        hot, consistent backup into the new directory DEST
    recover PATH DEST       salvage the commits of a damaged database up to the first lost one
                            (--past-gaps: every intact commit, listing each WAL record skipped)
    bench [--seconds N]     a quick benchmark in a temporary directory
    demo                    several processes sharing one database

Every failure is one line `protobase: ...` on stderr and exit status 1
(argparse usage errors exit 2); progress of long operations goes to stderr,
results to stdout. `status` and `stats` never start a coordinator; `check`,
`dump`, `backup` and `load` start one when none runs (it stops `--grace`
seconds after the command ends).

Dump format: JSON lines, one per top-level key of the root, in the root's
order: `{"key": K, "value": V}`, K and V in this tagged encoding:

    None, bool, int, str, float     themselves (ints beyond 10,000 bits: {"$int": "0x..."};
                                    NaN and infinities: {"$float": "nan" | "inf" | "-inf"})
    list                            a JSON array
    dict with str keys, none of     a JSON object
      them starting with "$"
    any other dict                  {"$dict": [[key, value], ...]}
    tuple                           {"$tuple": [...]}
    set                             {"$set": [...]}  (also {"$frozenset": [...]}; a snapshot
                                    reads both as a FrozenSet, so dump writes "$set")
    bytes                           {"$bytes": "<base64>"}
    datetime.datetime               {"$datetime": "<ISO 8601, offset kept when aware>"}
    datetime.date                   {"$date": "<ISO 8601>"}
    decimal.Decimal                 {"$decimal": "<str(value)>"}
    uuid.UUID                       {"$uuid": "<canonical text>"}
    indexed dict                    {"$indexed": {"fields": [...], "items": <dict as above>}}

A JSON object with exactly one key, starting with "$", is always a tag (an
unknown tag is an error), which is why dicts with such keys use "$dict".
Set elements and dict keys decode hashable (a nested set as a frozenset).
Registered dataclasses are not dumped (the command line cannot know their
classes): dump fails naming the value.

Dump streams: containers are written element by element from the snapshot,
so a tree of millions of entries never becomes one string. Load commits
batches of top-level keys; a collection larger than one batch is loaded over
several transactions (a dict key by key, a set or list in chunks), then its
indexes are created.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from typing import Any, TextIO

from protobase.errors import CorruptionError, DataDirectoryError, ProtoBaseError
from protobase.keyorder import order_key

__all__ = ["main", "build_parser", "encode_value", "decode_value", "dump_lines"]

DEFAULT_GRACE = 2.0
LOAD_BATCH_ITEMS = 5_000  # top-level keys, or elements of one big collection, per load transaction
LOAD_BATCH_BYTES = 8 << 20  # bytes of dump text per load transaction
STAGING_STOP_TIMEOUT = 300.0  # seconds (after the grace) for a loaded copy's final checkpoint and stop
BIG_INT_BITS = 10_000  # beyond this, ints are written in hex (int <-> decimal str is limited)


class CommandError(Exception):
    """A failure of a command that is the user's to fix: printed as one line."""


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protobase", description="ProtoBase: a shared transactional object database")
    commands = parser.add_subparsers(dest="command", required=True)
    grace = argparse.ArgumentParser(add_help=False)
    grace.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                       help="how long a coordinator this command starts lingers after it (default %(default)s)")

    serve = commands.add_parser("serve", help="run the coordinator of a data directory in the foreground")
    serve.add_argument("path", help="data directory (created if missing)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--flush-interval", type=float, default=None, metavar="SECONDS",
                       help="longest time an async commit waits for its fsync (default 0.01)")
    serve.add_argument("--checkpoint-bytes", type=int, default=None, metavar="BYTES",
                       help="WAL bytes after which a checkpoint is written (default 64 MiB)")
    serve.add_argument("--compact-min-bytes", type=int, default=None, metavar="BYTES",
                       help="garbage below which no compaction runs (default 64 MiB)")
    serve.add_argument("--reader-slots", type=reader_slot_count, default=None, metavar="N",
                       help="database handles that can be open at once, one per protobase.open() (default 1024)")

    status = commands.add_parser("status", help="what serves a data directory, and what is on disk")
    status.add_argument("path")
    status.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                        help="time between the two readings the commit rate is measured over")

    stats = commands.add_parser("stats", help="db.stats() of a running database as JSON")
    stats.add_argument("path")

    check = commands.add_parser("check", parents=[grace], help="verify every invariant of a database")
    check.add_argument("path")

    dump = commands.add_parser("dump", parents=[grace], help="the root as JSON lines (one per top-level key)")
    dump.add_argument("path")
    dump.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")

    load = commands.add_parser("load", parents=[grace], help="commit the lines of a dump into a database")
    load.add_argument("path", help="data directory (created if missing)")
    load.add_argument("file", help="a file written by `protobase dump` ('-' for stdin)")

    backup = commands.add_parser("backup", parents=[grace], help="hot, consistent backup into a new directory")
    backup.add_argument("path")
    backup.add_argument("destination")

    recover = commands.add_parser("recover", help="salvage the commits of a damaged database up to the first lost one")
    recover.add_argument("path", help="the damaged data directory (only read)")
    recover.add_argument("destination", help="a new directory to write the salvaged database to")
    recover.add_argument("--past-gaps", action="store_true",
                         help="also apply the intact commits after a lost one (they may depend on it); "
                              "every WAL record skipped is listed")

    bench = commands.add_parser("bench", help="a quick benchmark in a temporary directory")
    bench.add_argument("--seconds", type=float, default=1.0, help="duration of each measurement")
    bench.add_argument("--keys", type=int, default=10_000, help="size of the collection read")

    demo = commands.add_parser("demo", help="several processes sharing one database in a temporary directory")
    demo.add_argument("--writers", type=int, default=3)
    demo.add_argument("--transfers", type=int, default=300, help="transfers per writer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": serve, "status": status, "stats": stats, "check": check, "dump": dump, "load": load,
        "backup": backup, "recover": recover, "bench": bench, "demo": demo}
    try:
        return handlers[args.command](args)
    except CorruptionError as error:
        print(f"protobase: corrupt: {error}", file=sys.stderr)
        return 1
    except (ProtoBaseError, CommandError) as error:
        print(f"protobase: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        print(f"protobase:{where}: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("protobase: interrupted", file=sys.stderr)
        return 130


# -- helpers ------------------------------------------------------------------------------


def reader_slot_count(text: str) -> int:
    """`--reader-slots N`: a positive count that fits the control segment's u32."""
    if not text.isdigit() or not 1 <= int(text) < 2**32:
        raise argparse.ArgumentTypeError(f"--reader-slots takes a whole number from 1 to {2**32 - 1}, got {text!r}")
    return int(text)


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


def open_database(path: str, args: argparse.Namespace, **options: Any) -> Any:
    import protobase

    return protobase.open(path, shutdown_grace=getattr(args, "grace", DEFAULT_GRACE), **options)


class Progress:
    """A counter line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, what: str, stream: TextIO | None = None, every: float | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.2 if self.tty else 2.0)
        self.count = 0
        self.started = time.monotonic()
        self._shown = self.started

    def add(self, count: int = 1, detail: str = "") -> None:
        self.count += count
        now = time.monotonic()
        if now - self._shown >= self.every:
            self._shown = now
            self._show(detail)

    def _show(self, detail: str, final: bool = False) -> None:
        line = f"{self.what}: {self.count:,}{' ' + detail if detail else ''} ({time.monotonic() - self.started:.1f}s)"
        if self.tty:
            print(f"\r{line}\033[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def done(self, detail: str = "") -> None:
        self._show(detail, final=True)


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def disk_files(path: str) -> list[tuple[str, str, int]]:
    """(kind, name, size) of the checkpoint and WAL files of a data directory."""
    from protobase.persistence import wal
    from protobase.persistence.checkpoint import checkpoint_files

    found = []
    for kind, files in (("checkpoint", checkpoint_files(path)), ("wal", wal.list_wal_files(path))):
        for _, file in files:
            try:
                size = os.stat(file).st_size
            except FileNotFoundError:  # removed by the persistence process since we listed it
                continue
            found.append((kind, os.path.basename(file), size))
    return found


def print_disk(path: str) -> None:
    files = disk_files(path)
    print("on disk:")
    if not files:
        print("  no checkpoint and no WAL file (an empty database)")
    for kind, name, size in files:
        print(f"  {kind:<10} {name}  {human_bytes(size)}")
    total = {kind: sum(size for k, _, size in files if k == kind) for kind in ("checkpoint", "wal")}
    print(f"  total: checkpoints {human_bytes(total['checkpoint'])}, WAL {human_bytes(total['wal'])}")


# -- serve, recover, demo ---------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Foreground coordinator for systemd or containers: stops on SIGTERM/SIGINT, never on idle."""
    from protobase.coordinator.server import Coordinator
    from protobase.core.datadir import DataDir

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    settings = {name: getattr(args, name)
                for name in ("flush_interval", "checkpoint_bytes", "compact_min_bytes", "reader_slots")
                if getattr(args, name) is not None}
    coordinator = Coordinator(DataDir.open(args.path), grace=None, **settings)

    coordinator.start()
    print(f"protobase: serving {coordinator.datadir.path} (pid {os.getpid()}); Ctrl-C to stop", flush=True)
    coordinator.serve_forever()
    failure = coordinator.durability.failure if coordinator.durability is not None else None
    if failure:  # a failed exit, so that a supervisor (systemd Restart=on-failure) sees it
        print(f"protobase: stopped after a disk failure: {failure}; fix the disk, then start it again "
              f"(it recovers every acknowledged commit from the write-ahead log)", file=sys.stderr)
        return 1
    return 0


def recover(args: argparse.Namespace) -> int:
    """Salvage into a new directory; print what was kept and what was lost."""
    from protobase.coordinator.recovery import salvage

    report = salvage(args.path, args.destination, progress=lambda line: print(f"  {line}", flush=True),
                     past_gaps=args.past_gaps)
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
        print(f"LOST: WAL record{'s' if last > first else ''} {_lsn_range(first, last)} ({why}), the commit "
              f"after seq {report.seq}; recovery stopped there, since a later commit may depend on a lost one: "
              f"{report.records_left} intact WAL records after it were not applied. To apply them anyway, run "
              f"`protobase recover --past-gaps {os.path.abspath(args.path)} ANOTHER_NEW_DIR` (it lists every "
              f"record it skips)")
    print(f"open it with protobase.open({report.destination!r}); the damaged directory was not changed")
    return 0


def _lsn_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def demo(args: argparse.Namespace) -> int:
    from protobase.cli.demo import run

    return run(writers=args.writers, transfers=args.transfers)


# -- status and stats -----------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
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
        mine = getattr(db, "_slot", None)  # this command's own reader slot
    elapsed = latest.taken_at - first.taken_at
    rate = (latest.commits - first.commits) / elapsed if elapsed > 0 else 0.0
    print(f"database {path}")
    print(f"  coordinator pid {latest.coordinator_pid}, persistence pid {latest.persistence_pid or 'none'}")
    print(f"  seq {latest.seq}, {latest.commits} commits and {latest.conflicts} conflicts since it started, "
          f"{latest.compactions} compactions, {latest.checkpoints} checkpoints")
    print(f"  WAL: last LSN {latest.last_lsn}, durable LSN {latest.durable_lsn}, "
          f"lag {latest.last_lsn - latest.durable_lsn} records; {latest.wal_syncs} fsyncs; "
          f"{human_bytes(latest.wal_bytes_since_checkpoint)} since the last checkpoint")
    print(f"  memory: {latest.segments} segments, {human_bytes(latest.shared_bytes)} shared, "
          f"{human_bytes(latest.data_bytes)} data, {human_bytes(latest.live_bytes)} live, "
          f"{human_bytes(latest.reclaimable_bytes)} reclaimable")
    print(f"  commit rate: {rate:.1f} commits/s (over {elapsed:.2f}s)")
    others = [reader for reader in latest.readers if reader.slot != mine]
    print(f"  readers: {len(others)}" + ("" if others else " (besides this command)"))
    for reader in others:
        held = ("no snapshot" if reader.snapshot_seq is None
                else f"snapshot seq {reader.snapshot_seq}, {reader.snapshot_age} commits old")
        print(f"    pid {reader.pid} (slot {reader.slot}): {held}")
    oldest = latest.oldest_reader
    if oldest is not None and oldest.slot != mine:
        print(f"  oldest snapshot: pid {oldest.pid} (slot {oldest.slot}) has held seq {oldest.snapshot_seq} for "
              f"{oldest.held_seconds:.1f}s, keeping {human_bytes(oldest.retained_bytes)} of retired segments "
              f"in shared memory")
    if latest.compaction_failures:
        print(f"  compactions that failed and were undone: {latest.compaction_failures} "
              f"(see the coordinator's log; /dev/shm may be full)")
    print_disk(path)
    return 0


def stats(args: argparse.Namespace) -> int:
    import protobase

    path = existing_datadir(args.path)
    with protobase.open(path, create=False, start_coordinator=False) as db:
        reading = db.stats()
    print(json.dumps(dataclasses.asdict(reading), indent=2))
    return 0


# -- check --------------------------------------------------------------------------------


def check(args: argparse.Namespace) -> int:
    path = existing_datadir(args.path)
    started = time.monotonic()
    with open_database(path, args, create=False) as db:
        db.check()
        reading = db.stats()
        with db.snapshot() as snapshot:
            keys = len(snapshot.root)
    print(f"ok: {path} at seq {reading.seq}: every invariant holds ({keys} top-level keys, "
          f"{human_bytes(reading.live_bytes)} live, checked in {time.monotonic() - started:.2f}s)")
    return 0


# -- the dump encoding -------------------------------------------------------------------------


_TAGS = ("$int", "$float", "$dict", "$tuple", "$set", "$frozenset", "$bytes", "$datetime", "$date",
         "$decimal", "$uuid", "$indexed")


def _scalar(value: Any) -> Any:
    """The JSON-safe form of a non-container value, or NotImplemented for containers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return {"$int": hex(value)} if value.bit_length() > BIG_INT_BITS else value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    return NotImplemented


def _plain_keys(mapping: Mapping) -> bool:
    return all(type(key) is str and not key.startswith("$") for key in mapping)


class _Unsupported(Exception):
    """A value with no dump encoding; `path` is filled in (innermost first) on the way out."""

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self.value = value
        self.path: list[str] = []

    def describe(self, what: str) -> str:
        kind = type(self.value)
        return (f"cannot dump {what}{''.join(reversed(self.path))}: a {kind.__module__}.{kind.__qualname__} "
                f"(registered dataclasses and other types have no dump encoding)")


_encode_str = json.encoder.encode_basestring  # the C encoder when available; ensure_ascii=False
_int_repr = int.__repr__
_float_repr = float.__repr__
_CONSTANTS = {None: "null", True: "true", False: "false"}


def write_value(value: Any, write: Callable[[str], Any]) -> None:
    """Write the tagged JSON of `value` piece by piece (containers element by element).

    Raises _Unsupported for a value without an encoding (a dataclass, say).
    """
    kind = type(value)
    if kind is str:
        write(_encode_str(value))
        return
    if kind is int and value.bit_length() <= BIG_INT_BITS:
        write(_int_repr(value))
        return
    if kind is float and math.isfinite(value):
        write(_float_repr(value))
        return
    if value is None or kind is bool:
        write(_CONSTANTS[value])
        return
    scalar = _scalar(value)
    if scalar is not NotImplemented:
        write(json.dumps(scalar, ensure_ascii=False))
        return
    if isinstance(value, Mapping):
        indexes = tuple(getattr(value, "indexes", ()) or ())
        if indexes:
            write('{"$indexed": {"fields": ')
            write(json.dumps(list(indexes), ensure_ascii=False))
            write(', "items": ')
        plain = _plain_keys(value)
        write("{" if plain else '{"$dict": [')
        for number, (key, item) in enumerate(value.items()):
            try:
                if plain:
                    write(("," if number else "") + _encode_str(key) + ":")
                else:
                    write(",[" if number else "[")
                    write_value(key, write)
                    write(",")
                write_value(item, write)
                if not plain:
                    write("]")
            except _Unsupported as error:
                error.path.append(f"[{key!r}]")
                raise
        write("}" if plain else "]}")
        if indexes:
            write("}}")
        return
    if isinstance(value, tuple):
        prefix, suffix = '{"$tuple": [', "]}"
    elif isinstance(value, AbstractSet):
        prefix, suffix = '{"$set": [', "]}"
        if not hasattr(value, "ptr"):  # a small set: canonical order, so that dumps are reproducible
            value = sorted(value, key=order_key)
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, str)):
        prefix, suffix = "[", "]"
    else:
        raise _Unsupported(value)
    write(prefix)
    for number, item in enumerate(value):
        if number:
            write(",")
        try:
            write_value(item, write)
        except _Unsupported as error:
            error.path.append(f"[{number}]")
            raise
    write(suffix)


def encode_value(value: Any) -> str:
    """The tagged JSON text of `value` (for small values; dump streams)."""
    parts: list[str] = []
    try:
        write_value(value, parts.append)
    except _Unsupported as error:
        raise CommandError(error.describe("value")) from None
    return "".join(parts)


class _Indexed(dict):
    """A decoded indexed dict, until load has created its indexes."""

    fields: tuple[str, ...] = ()


def _hashable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return frozenset(_hashable(item) for item in value)
    if isinstance(value, tuple):
        return tuple(_hashable(item) for item in value)
    return value


def _object_hook(obj: dict) -> Any:
    if len(obj) != 1:
        return obj
    (tag, payload), = obj.items()
    if not tag.startswith("$"):
        return obj
    try:
        if tag == "$int":
            return int(payload, 16)
        if tag == "$float":
            return float(payload)
        if tag == "$dict":
            return {_hashable(key): value for key, value in payload}
        if tag == "$tuple":
            return tuple(payload)
        if tag == "$set":
            return {_hashable(item) for item in payload}
        if tag == "$frozenset":
            return frozenset(_hashable(item) for item in payload)
        if tag == "$bytes":
            return base64.b64decode(payload, validate=True)
        if tag == "$datetime":
            return dt.datetime.fromisoformat(payload)
        if tag == "$date":
            return dt.date.fromisoformat(payload)
        if tag == "$decimal":
            return Decimal(payload)
        if tag == "$uuid":
            return uuid.UUID(payload)
        if tag == "$indexed":
            indexed = _Indexed(payload["items"])
            indexed.fields = tuple(payload["fields"])
            return indexed
    except (TypeError, ValueError, KeyError, ArithmeticError) as error:
        raise ValueError(f"bad {tag} value {payload!r:.80}: {error}") from None
    raise ValueError(f"unknown tag {tag!r} (known: {', '.join(_TAGS)})")


def decode_value(text: str) -> Any:
    """The value of tagged JSON text (indexed dicts come back as plain dicts)."""
    value = json.loads(text, object_hook=_object_hook)
    _take_indexes(value, ())
    return _plain(value)


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, _Indexed) else value


def _take_indexes(value: Any, path: tuple) -> list[tuple[tuple, tuple[str, ...]]]:
    """(path, fields) of every indexed dict reachable by dict keys; turns them into plain dicts."""
    found: list[tuple[tuple, tuple[str, ...]]] = []
    if isinstance(value, list):  # not addressable by key path: an index there cannot be recreated
        for number, item in enumerate(value):
            _take_indexes(item, path + (number,))
            if isinstance(item, _Indexed):
                value[number] = dict(item)
        return found
    if not isinstance(value, dict):
        return found
    if isinstance(value, _Indexed):
        found.append((path, value.fields))
    for key, item in value.items():
        if isinstance(item, dict):
            found.extend(_take_indexes(item, path + (key,)))
            if isinstance(item, _Indexed):
                value[key] = dict(item)
    return found


# -- dump ---------------------------------------------------------------------------------


def dump_lines(root: Mapping, out: TextIO, progress: Progress | None = None) -> int:
    """Write the dump of `root` to `out`; return the number of lines."""
    lines = 0
    for key, value in root.items():
        out.write('{"key": ')
        try:
            write_value(key, out.write)
            out.write(', "value": ')
            write_value(value, out.write)
        except _Unsupported as error:
            raise CommandError(error.describe(f"root[{key!r}]")) from None
        out.write("}\n")
        lines += 1
        if progress is not None:
            progress.add(1, "top-level keys")
    return lines


def dump(args: argparse.Namespace) -> int:
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


def _read_dump(file: TextIO, name: str) -> Iterator[tuple[int, Any, Any, list, int]]:
    """(line number, key, value, indexes, size) of every line of a dump."""
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_hook=_object_hook)
            if not isinstance(record, dict) or set(record) != {"key", "value"}:
                raise ValueError('expected an object {"key": ..., "value": ...}')
            key, value = _hashable(_plain(record["key"])), record["value"]
            indexes = _take_indexes(value, ())
            value = _plain(value)
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            raise CommandError(f"{name} line {number} is not a dump line: {error}") from None
        yield number, key, value, indexes, len(line)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _load_big(db: Any, key: Any, value: Any, progress: Progress) -> None:
    """Load one collection larger than a batch over several transactions."""
    if isinstance(value, dict):
        items = list(value.items())
        with db.transaction() as tx:
            tx.root[key] = dict(items[:LOAD_BATCH_ITEMS])
        progress.add(0, f"lines, {key!r}: {min(len(items), LOAD_BATCH_ITEMS):,}/{len(items):,}")
        for start in range(LOAD_BATCH_ITEMS, len(items), LOAD_BATCH_ITEMS):
            with db.transaction() as tx:
                target = tx.root[key]
                for item_key, item in items[start:start + LOAD_BATCH_ITEMS]:
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


def _create_indexes(db: Any, key: Any, indexes: list[tuple[tuple, tuple[str, ...]]]) -> None:
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


def _commit_lines(db: Any, source: TextIO, name: str, progress: Progress) -> None:
    batch: list[tuple[Any, Any, list]] = []
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
    from protobase.persistence.wal import fsync_directory

    if not DataDir(staging).wait_until_unserved(grace + STAGING_STOP_TIMEOUT):
        raise CommandError(f"the load is complete in {staging}, but its coordinator has not stopped after "
                           f"{grace + STAGING_STOP_TIMEOUT:.0f}s; once it has, rename {staging} to {target}")
    try:
        os.rename(staging, target)  # replaces an empty directory
    except OSError as error:
        raise CommandError(f"the load is complete in {staging}, but it cannot be renamed to {target} "
                           f"({error.strerror}); rename it yourself") from None
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


# -- backup --------------------------------------------------------------------------------


def backup(args: argparse.Namespace) -> int:
    from protobase.persistence.checkpoint import read_checkpoint

    path = existing_datadir(args.path)
    destination = os.path.abspath(args.destination)
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise DataDirectoryError(f"backup destination {destination} exists and is not an empty directory; "
                                 f"pass a new directory")
    print(f"backing up {path} to {destination} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    with open_database(path, args, create=False) as db:
        written = db.backup(destination)
    header = read_checkpoint(written)
    size = os.stat(written).st_size
    print(f"backup of {path} at seq {header.seq} written to {written} ({human_bytes(size)}, "
          f"{time.monotonic() - started:.2f}s); open it with protobase.open({destination!r}) "
          f"or `protobase status {destination}`")
    return 0


# -- bench --------------------------------------------------------------------------------


def _rate(seconds: float, step: Callable[[], int]) -> float:
    """Operations per second of `step` (which returns how many it did) run for `seconds`."""
    done = 0
    started = time.perf_counter()
    deadline = started + max(seconds, 0.01)
    while True:
        done += step()
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - started)


def bench(args: argparse.Namespace) -> int:
    import random
    import shutil
    import tempfile

    import protobase

    directory = tempfile.mkdtemp(prefix="protobase-bench-")
    path = os.path.join(directory, "db")
    keys = [f"k{i}" for i in range(max(args.keys, 1))]
    plain = {key: {"n": i, "name": key} for i, key in enumerate(keys)}
    sample = [random.Random(7).choice(keys) for _ in range(1000)]
    print(f"bench: {len(keys):,} records, {args.seconds}s per measurement, in {path}", file=sys.stderr)
    try:
        db = protobase.open(path, shutdown_grace=0.05)
        try:
            with db.transaction() as tx:
                tx.root["items"] = plain
                tx.root["counter"] = 0

            def dict_reads() -> int:
                for key in sample:
                    plain[key]
                return len(sample)

            with db.snapshot() as snapshot:
                items = snapshot.root["items"]

                def snapshot_reads() -> int:
                    for key in sample:
                        items[key]
                    return len(sample)

                snapshot_reads()  # warm the caches, as a long-running reader has them
                snap_rate = _rate(args.seconds, snapshot_reads)
            dict_rate = _rate(args.seconds, dict_reads)

            def commits(durability: str) -> Callable[[], int]:
                def step() -> int:
                    with db.transaction(durability=durability) as tx:
                        tx.root["counter"] += 1
                    return 1
                return step

            sync_rate = _rate(args.seconds, commits("sync"))
            async_rate = _rate(args.seconds, commits("async"))
        finally:
            db.close()
        db.datadir.wait_until_unserved()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"point reads, snapshot:  {snap_rate:14,.0f} /s  ({snap_rate / dict_rate:.2f}x a plain dict)")
    print(f"point reads, dict:      {dict_rate:14,.0f} /s")
    print(f"commits, sync:          {sync_rate:14,.0f} /s")
    print(f"commits, async:         {async_rate:14,.0f} /s  ({async_rate / sync_rate:.1f}x sync)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
