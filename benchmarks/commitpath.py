"""The coordinator's CPU per single-key commit, in one process: `python -m benchmarks.commitpath`.

What `Commits.commit` costs (parse, validate, apply, flush, log, publish) for
one SET of a small record into a 100,000-key dict (`--indexes 2`: with two
indexes on its records' fields, whose values the update changes; with
`--same-fields` too, it leaves them as they were, as the suite's W3 updates
do), without the socket, the
client or the persistence process: the coordinator's own share of a commit,
the part the compiled core is moving into C. Its collaborators are stubs that
keep nothing (a WAL record is encoded, then dropped).

* default: microseconds per commit, the best of `--rounds` rounds of
  `--commits` commits (the machine is shared: the best is the least disturbed);
* `--callgrind`: instructions per commit, repeatable to a fraction of a
  percent where timings move by 20%: the script runs itself twice under
  `valgrind --tool=callgrind` (300 and 1,300 commits) and prints the
  difference over the 1,000 commits between, so start-up and the load drop out
  (with PYTHONHASHSEED=0: string hashes, and so dict and set layouts, would
  otherwise move the count by up to 7%).

It prints; nothing is asserted. Run it on two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from protobase.collector import Collector
from protobase.coordinator.commits import Commits
from protobase.coordinator.writer import Writer
from protobase.core import codec
from protobase.core.arena import ArenaWriter, AtomReader
from protobase.core.store import Store
from protobase.shm import new_instance_id, sweep
from protobase.wire.opcodes import OP_CREATE_INDEX, OP_SET

RECORDS = 100_000


FIELDS = ("city", "score")  # what `--indexes N` indexes


def record(n: int, i: int) -> dict[str, Any]:
    return {"n": n, "city": f"c{i % 50}", "score": i % 100}


class _Control:
    def publish_root(self, seq: int, root: int) -> None:
        pass

    def oldest_snapshot(self) -> None:
        return None


class _Durability:
    failure = None
    durable_lsn = 0

    def __init__(self) -> None:
        self.next_lsn = 1

    def enqueue(self, payload: list[bytes], sync: bool) -> int:
        self.next_lsn += 1
        return self.next_lsn - 1


class _Connections:
    def answer(self, asker: Any, reply: Any) -> None:
        pass

    def notify(self, seq: int, paths: list[Any]) -> None:
        pass


class _Client:
    """The one client (Commits keeps a weak reference to it)."""


class _Asker:
    def __init__(self) -> None:
        self.client = _Client()
        self.request_id = 0


def run(commits: int, rounds: int, indexes: int = 0, same_fields: bool = False) -> float:
    """The best microseconds per commit over `rounds` rounds of `commits` commits (into a collection with `indexes`;
    updates that keep the indexed fields' values with `same_fields`)."""
    instance = new_instance_id()
    arena = ArenaWriter(instance)
    writer = Writer(arena, Store(AtomReader(instance, writer=arena)))
    state = Commits(
        writer,
        _Control(),  # type: ignore[arg-type]
        _Durability(),  # type: ignore[arg-type]
        _Connections(),  # type: ignore[arg-type]
        seq=0,
        root=0,
        directory="/bench",
        on_applied=lambda: None,
    )
    asker = _Asker()

    def commit(ops: list[Any]) -> None:
        state.commit(asker, state.seq, False, "async", codec.encode(ops), [])  # type: ignore[arg-type]

    try:
        commit([[OP_SET, ["users"], {f"u{i}": record(i, i) for i in range(RECORDS)}]])
        for field in FIELDS[:indexes]:
            commit([[OP_CREATE_INDEX, ["users"], field]])
        Collector().install()  # as the coordinator does once it is up
        best = float("inf")
        for round_number in range(rounds):
            started = time.perf_counter()
            for i in range(commits):
                n = (i * 7919 + round_number) % RECORDS
                commit([[OP_SET, ["users", f"u{n}"], record(-i, n if same_fields else i)]])
            best = min(best, (time.perf_counter() - started) / commits * 1e6)
        return best
    finally:
        writer.store.reader.close()
        arena.close(unlink=True)
        sweep(instance)


def instructions_per_commit(indexes: int, same_fields: bool) -> float:
    """Instructions per commit under callgrind: two runs, 1,000 commits apart."""
    counts = []
    for commits in (300, 1300):
        with tempfile.TemporaryDirectory() as directory:
            out = subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={os.path.join(directory, 'out')}",
                    sys.executable,
                    "-m",
                    "benchmarks.commitpath",
                    "--commits",
                    str(commits),
                    "--rounds",
                    "1",
                    "--indexes",
                    str(indexes),
                    *(["--same-fields"] if same_fields else []),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict and set layouts in every run
            )
        found = re.search(r"Collected : (\d+)", out.stderr)
        if found is None:
            raise SystemExit(f"callgrind printed no count:\n{out.stderr}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.commitpath", description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="instructions per commit (needs valgrind)")
    parser.add_argument("--indexes", type=int, default=0, choices=range(len(FIELDS) + 1), help="indexed fields")
    parser.add_argument("--same-fields", action="store_true", help="updates keep the indexed fields' values")
    args = parser.parse_args(argv)
    what = f"coordinator, one SET into a {RECORDS:,}-key dict"
    what += f" with {args.indexes} indexes" if args.indexes else ""
    what += " (indexed fields unchanged)" if args.same_fields else ""
    if args.callgrind:
        print(f"{what}: {instructions_per_commit(args.indexes, args.same_fields):,.0f} instructions/commit")
    else:
        best = run(args.commits, args.rounds, args.indexes, args.same_fields)
        print(f"{what}: {best:.1f} us/commit (best of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
