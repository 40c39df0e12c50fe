"""`python -m protobase.coordinator DIR`: run a coordinator for one data directory.

The data directory's absolute path is on the command line so `ps` shows which
database a coordinator serves; every tunable has a flag (`--grace`,
`--flush-interval`, ...: protobase/settings.py). With `--daemon` (used by
`protobase.open`) the process starts the coordinator in a detached
grandchild and exits once it listens, reporting a start-up failure on stderr
with exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from protobase import settings
from protobase.coordinator.server import Coordinator
from protobase.core.datadir import DataDir
from protobase.errors import ProtoBaseError


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line: the directory, every Settings flag (protobase/settings.py), --daemon, --log-level."""
    parser = argparse.ArgumentParser(prog="python -m protobase.coordinator")
    parser.add_argument("path", help="data directory (absolute path)")
    parser.add_argument("--daemon", action="store_true", help="detach; exit once serving")
    parser.add_argument("--log-level", default="WARNING")
    settings.add_arguments(parser)
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> Coordinator:
    return Coordinator(DataDir.open(args.path), settings.from_arguments(args))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    if args.daemon:
        return daemonize(args)
    try:
        coordinator = build(args)
        coordinator.start()
    except ProtoBaseError as error:
        print(f"protobase coordinator: {error}", file=sys.stderr)
        return 1
    coordinator.serve_forever()
    return 0


def daemonize(args: argparse.Namespace) -> int:
    """Fork a detached coordinator; return once it serves (0) or failed to start (1)."""
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as status:
            message = status.read().decode(errors="replace")
        if message != "ok":
            print(message or "CoordinatorError\nthe coordinator died while starting", file=sys.stderr)
            return 1
        return 0
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    try:
        coordinator = build(args)
        log_fd = os.open(
            coordinator.datadir.file("coordinator.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        os.dup2(log_fd, 2)
        os.close(log_fd)
        coordinator.start()
    except BaseException as error:  # report any start-up failure to the launcher, then exit
        os.write(write_end, f"{type(error).__name__}\n{error}".encode())
        os._exit(1)
    os.write(write_end, b"ok")
    os.close(write_end)
    try:
        coordinator.serve_forever()
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
