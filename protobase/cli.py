"""The `protobase` command line (also `python -m protobase`)."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import ProtoBaseError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protobase", description="ProtoBase: a shared transactional object database")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the coordinator of a data directory in the foreground")
    serve.add_argument("path", help="data directory (created if missing)")
    serve.add_argument("--log-level", default="INFO")
    recover = commands.add_parser("recover", help="salvage every intact commit of a damaged database")
    recover.add_argument("path", help="the damaged data directory (only read)")
    recover.add_argument("destination", help="a new directory to write the salvaged database to")
    demo = commands.add_parser("demo", help="several processes sharing one database in a temporary directory")
    demo.add_argument("--writers", type=int, default=3)
    demo.add_argument("--transfers", type=int, default=300, help="transfers per writer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "recover":
            return recover(args)
        if args.command == "demo":
            from .demo import run

            return run(writers=args.writers, transfers=args.transfers)
    except ProtoBaseError as error:
        print(f"protobase: {error}", file=sys.stderr)
        return 1
    return 2


def serve(args: argparse.Namespace) -> int:
    """Foreground coordinator for systemd or containers: stops on SIGTERM/SIGINT, never on idle."""
    import os

    from .coordinator.server import Coordinator
    from .datadir import DataDir

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    coordinator = Coordinator(DataDir.open(args.path), grace=None)
    coordinator.start()
    print(f"protobase: serving {coordinator.datadir.path} (pid {os.getpid()}); Ctrl-C to stop", flush=True)
    coordinator.serve_forever()
    return 0


def recover(args: argparse.Namespace) -> int:
    """Salvage into a new directory; print what was kept and what was lost."""
    from .coordinator.recovery import salvage

    report = salvage(args.path, args.destination, progress=lambda line: print(f"  {line}", flush=True))
    print(f"recovered {report.records_applied} commits up to seq {report.seq} into {report.destination}")
    for lsn, why in report.records_skipped:
        print(f"  skipped WAL record {lsn}: {why}")
    for path, start, end in report.damaged_ranges:
        print(f"  unreadable bytes {start}..{end} of {path}")
    for path in report.damaged_checkpoints:
        print(f"  damaged checkpoint {path} was not used")
    print(f"open it with protobase.open({report.destination!r}); the damaged directory was not changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
