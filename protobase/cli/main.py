"""The `protobase` command line (also `python -m protobase`): its parser and dispatch.

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

Each command lives in a module of this package: `serve`; `inspection`
(status, stats, check); `transfer` (dump, load) over `dumpformat`, which
specifies the dump format; `backup` (backup, recover); `bench`; `demo`.
What they share is in `command` (CommandError, opening a data directory) and
`output` (progress lines, byte counts).

Runs in the user's shell process; `serve` becomes a coordinator in place.
Invariant: every failure is one line `protobase: ...` on stderr and exit
status 1 (argparse usage errors exit 2); progress of long operations goes to
stderr, results to stdout. `status` and `stats` never start a coordinator;
`check`, `dump`, `backup` and `load` start one when none runs (it stops
`--grace` seconds after the command ends).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, Protocol

from protobase import settings
from protobase.cli.backup import backup, recover
from protobase.cli.bench import bench
from protobase.cli.command import DEFAULT_GRACE, CommandError
from protobase.cli.inspection import check, stats, status
from protobase.cli.serve import serve
from protobase.cli.transfer import dump, load
from protobase.errors import CorruptionError, ProtoBaseError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command and its options."""
    parser = argparse.ArgumentParser(prog="protobase", description="ProtoBase: a shared transactional object database")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_server_commands(commands)
    _add_data_commands(commands)
    _add_tool_commands(commands)
    return parser


class Commands(Protocol):
    """The sub-commands of the parser (what argparse's add_subparsers returns)."""

    def add_parser(self, name: str, **options: Any) -> argparse.ArgumentParser: ...


def _grace_option() -> argparse.ArgumentParser:
    """The --grace option of every command that may start a coordinator."""
    grace = argparse.ArgumentParser(add_help=False)
    grace.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="how long a coordinator this command starts lingers after it (default %(default)s)",
    )
    return grace


def _add_server_commands(commands: Commands) -> None:
    """serve, status, stats: the coordinator and what it reports."""
    serve = commands.add_parser("serve", help="run the coordinator of a data directory in the foreground")
    serve.add_argument("path", help="data directory (created if missing)")
    serve.add_argument("--log-level", default="INFO")
    settings.add_arguments(serve, exclude=("shutdown_grace",))  # serve never stops on idle

    status = commands.add_parser("status", help="what serves a data directory, and what is on disk")
    status.add_argument("path")
    status.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="time between the two readings the commit rate is measured over",
    )

    stats = commands.add_parser("stats", help="db.stats() of a running database as JSON")
    stats.add_argument("path")


def _add_data_commands(commands: Commands) -> None:
    """check, dump, load, backup, recover: what is in a database, in and out of it."""
    grace = _grace_option()
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
    recover.add_argument(
        "--past-gaps",
        action="store_true",
        help="also apply the intact commits after a lost one (they may depend on it); "
        "every WAL record skipped is listed",
    )


def _add_tool_commands(commands: Commands) -> None:
    """bench, demo: ProtoBase at work in a temporary directory."""
    bench = commands.add_parser("bench", help="a quick benchmark in a temporary directory")
    bench.add_argument("--seconds", type=float, default=1.0, help="duration of each measurement")
    bench.add_argument("--keys", type=int, default=10_000, help="size of the collection read")

    demo = commands.add_parser("demo", help="several processes sharing one database in a temporary directory")
    demo.add_argument("--writers", type=int, default=3)
    demo.add_argument("--transfers", type=int, default=300, help="transfers per writer")


def demo(args: argparse.Namespace) -> int:
    """`protobase demo`: see protobase.cli.demo."""
    from protobase.cli.demo import run

    return run(writers=args.writers, transfers=args.transfers)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (the entry point of the `protobase` script)."""
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": serve,
        "status": status,
        "stats": stats,
        "check": check,
        "dump": dump,
        "load": load,
        "backup": backup,
        "recover": recover,
        "bench": bench,
        "demo": demo,
    }
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


if __name__ == "__main__":
    sys.exit(main())
