"""`python -m benchmarks core|suite|gcpauses [options]`: run a benchmark and report it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import core

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="benchmark", required=True)
    core_parser = commands.add_parser("core", help="core engine: reads vs LMDB and dict, commits, memory")
    core_parser.add_argument(
        "--records",
        type=int,
        default=None,
        help="records for every part (default: "
        f"{core.DEFAULT_READ_RECORDS:,} for reads and commits, "
        f"{core.DEFAULT_MEMORY_RECORDS:,} for memory)",
    )
    core_parser.add_argument("--read-records", type=int, default=None, help="records for reads and commits")
    core_parser.add_argument("--memory-records", type=int, default=None, help="records for the memory part")
    core_parser.add_argument("--repeats", type=int, default=9, help="timed read passes per store (median)")
    core_parser.add_argument("--commits", type=int, default=5000, help="timed commits of each kind")
    core_parser.add_argument("--doc", default=DOC, help="markdown file to write the results into")
    core_parser.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    core_parser.add_argument(
        "--profile", action="store_true", help="print a cProfile of the warm read loop even when the targets are met"
    )
    suite_parser = commands.add_parser("suite", help="every store side by side (docs/benchmarks.md)")
    suite_parser.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
    suite_parser.add_argument("--records", type=int, default=None, help="records for W1-W5")
    suite_parser.add_argument("--memory-records", type=int, default=None, help="records for W6 (memory)")
    suite_parser.add_argument("--only", nargs="+", default=None, help="only these stores (names or classes)")
    suite_parser.add_argument("--no-memory", action="store_true", help="skip W6")
    suite_parser.add_argument("--doc", default=None, help="markdown file to write the results into")
    suite_parser.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    gc_parser = commands.add_parser("gcpauses", help="commit latency and the coordinator's GC pauses, before/after")
    gc_parser.add_argument("--records", type=int, default=None, help="records loaded first (default 1,000,000)")
    gc_parser.add_argument("--commits", type=int, default=None, help="timed single-key commits (default 20,000)")
    gc_parser.add_argument("--durability", choices=("async", "sync"), default="async")
    gc_parser.add_argument("--only", nargs="+", choices=("before", "after"), default=None, help="only these runs")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    if args.benchmark == "gcpauses":
        from . import gcpauses

        return gcpauses.run(
            args.records or gcpauses.DEFAULT_RECORDS,
            args.commits or gcpauses.DEFAULT_COMMITS,
            args.durability,
            args.only,
        )
    if args.benchmark == "suite":
        from . import suite

        cfg = dict(suite.QUICK if args.quick else suite.FULL)
        cfg["records"] = args.records or cfg["records"]
        cfg["memory_records"] = args.memory_records or cfg["memory_records"]
        return suite.run(
            cfg=cfg,
            only=args.only,
            command=command,
            memory=not args.no_memory,
            doc=None if args.no_doc else (args.doc or suite.DOC),
        )

    read_records = args.read_records or args.records or core.DEFAULT_READ_RECORDS
    memory_records = args.memory_records or args.records or core.DEFAULT_MEMORY_RECORDS
    return core.run(
        read_records=read_records,
        memory_records=memory_records,
        repeats=args.repeats,
        commits=args.commits,
        command=command,
        doc=None if args.no_doc else args.doc,
        show_profile=args.profile,
    )


if __name__ == "__main__":
    sys.exit(main())
