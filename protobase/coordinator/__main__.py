"""`python -m protobase.coordinator DIR`: run a coordinator for one data directory.

The data directory's absolute path is on the command line so `ps` shows which
database a coordinator serves. With `--daemon` (used by `protobase.open`) the
process starts the coordinator in a detached grandchild and exits once it
listens, reporting a start-up failure on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from protobase.coordinator.server import (
    DEFAULT_CHECKPOINT_BYTES,
    DEFAULT_COMPACT_MIN_BYTES,
    DEFAULT_FLUSH_INTERVAL,
    Coordinator,
)
from protobase.core.datadir import DataDir
from protobase.errors import ProtoBaseError
from protobase.shm.control import DEFAULT_READER_SLOTS


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m protobase.coordinator")
    parser.add_argument("path", help="data directory (absolute path)")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds to linger once the last client left; negative: serve forever")
    parser.add_argument("--compact-min-bytes", type=int, default=DEFAULT_COMPACT_MIN_BYTES)
    parser.add_argument("--checkpoint-bytes", type=int, default=DEFAULT_CHECKPOINT_BYTES,
                        help="WAL bytes after which a checkpoint is written")
    parser.add_argument("--flush-interval", type=float, default=DEFAULT_FLUSH_INTERVAL,
                        help="longest time an async commit waits for fsync (seconds)")
    parser.add_argument("--reader-slots", type=int, default=DEFAULT_READER_SLOTS,
                        help="processes that may have the database open at once")
    parser.add_argument("--daemon", action="store_true", help="detach; exit once serving")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> Coordinator:
    datadir = DataDir.open(args.path)
    grace = None if args.grace < 0 else args.grace
    return Coordinator(datadir, grace=grace, compact_min_bytes=args.compact_min_bytes,
                       checkpoint_bytes=args.checkpoint_bytes, flush_interval=args.flush_interval,
                       reader_slots=args.reader_slots)


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
        log_fd = os.open(coordinator.datadir.file("coordinator.log"),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
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
