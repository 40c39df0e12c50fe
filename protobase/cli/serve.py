"""`protobase serve PATH`: the coordinator of a data directory, in the foreground.

Runs the coordinator in the process of the command, for systemd or
containers: it stops on SIGTERM/SIGINT, never on idle (no grace period).
Invariant: the exit status says whether it stopped cleanly (0) or after a
disk failure (1), so that a supervisor's Restart=on-failure sees the
difference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["serve"]


def serve(args: argparse.Namespace) -> int:
    """Foreground coordinator for systemd or containers: stops on SIGTERM/SIGINT, never on idle."""
    from protobase.coordinator.server import Coordinator
    from protobase.core.datadir import DataDir
    from protobase.settings import Settings, from_arguments

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    settings = from_arguments(args, base=Settings(shutdown_grace=None))
    coordinator = Coordinator(DataDir.open(args.path), settings)

    coordinator.start()
    print(f"protobase: serving {coordinator.datadir.path} (pid {os.getpid()}); Ctrl-C to stop", flush=True)
    coordinator.serve_forever()
    failure = coordinator.durability.failure if coordinator.durability is not None else None
    if failure:  # a failed exit, so that a supervisor (systemd Restart=on-failure) sees it
        print(
            f"protobase: stopped after a disk failure: {failure}; fix the disk, then start it again "
            f"(it recovers every acknowledged commit from the write-ahead log)",
            file=sys.stderr,
        )
        return 1
    return 0
