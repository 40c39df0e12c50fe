"""Crash test: SIGKILL writers, the coordinator, the persistence process or the whole group.

Writers commit with durability="sync" and append each commit's number to an
acknowledgement file only after the commit returned. Every round kills one
victim at a random moment, then every writer; the database is reopened
(recovering from the checkpoint and WAL if the coordinator died) and checked:

- every acknowledged commit is there (no loss);
- each writer's record holds exactly entries 0..count, so no commit is
  half-applied (each commit writes an entry and the count together).

Run the long version with `python -m stress.crash --rounds 200`; the default
test suite runs a short one (tests/test_crash.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

import protobase

VICTIMS = ("coordinator", "persistence", "writer", "group")
GRACE = 0.2


def writer_main(path: str, writer: int, ack_path: str) -> None:
    """Commit forever, acknowledging each commit once it returned."""
    try:
        _commit_forever(path, writer, ack_path)
    except protobase.ProtoBaseError as error:  # expected when the coordinator is killed under us
        with open(f"{ack_path}.errors", "a") as file:
            file.write(f"{type(error).__name__}: {error}\n")


def _commit_forever(path: str, writer: int, ack_path: str) -> None:
    key = f"w{writer}"
    with protobase.open(path, shutdown_grace=GRACE) as db, open(ack_path, "a", buffering=1) as acks:
        while True:
            # The count is read inside each attempt: a commit of the previous round whose
            # fsync was in flight when its writer was killed is published a little later,
            # and writing over it conflicts; the retry then sees it.
            for attempt in db.attempts(retries=1000, backoff=0.002):
                with attempt as tx:
                    record = tx.root.get(key)
                    number = record["count"] + 1 if record is not None else 0
                    if number == 0:
                        tx.root[key] = {"count": 0, "e0": 0}
                    else:
                        record[f"e{number}"] = number
                        record["count"] = number
            acks.write(f"{number}\n")


def acknowledged(ack_path: str) -> list[int]:
    if not os.path.exists(ack_path):
        return []
    with open(ack_path) as file:
        return [int(line) for line in file.read().split("\n")[:-1] if line]  # a torn last line is no ack


@dataclass
class Outcome:
    acknowledged: int  # commits acknowledged so far, all writers
    lost: int  # acknowledged commits missing after recovery
    half_applied: int  # records whose entries disagree with their count
    kills: int


def check(path: str, ack_paths: list[str]) -> tuple[int, int, int]:
    """(acknowledged, lost, half-applied) after reopening the database."""
    total = lost = broken = 0
    with protobase.open(path, shutdown_grace=GRACE) as db:
        with db.snapshot() as snap:
            for writer, ack_path in enumerate(ack_paths):
                acks = acknowledged(ack_path)
                total += len(acks)
                record = snap.root.get(f"w{writer}")
                count = record["count"] if record is not None else -1
                lost += sum(1 for number in acks if number > count)
                if record is not None and set(record) != {"count", *(f"e{i}" for i in range(count + 1))}:
                    broken += 1
        db.check()
    return total, lost, broken


def run(rounds: int, writers: int = 2, seed: int | None = None, base: str | None = None, log=print) -> Outcome:
    """Run `rounds` kill rounds on one database; return what was lost (nothing, we hope)."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    log(f"crash test: {rounds} rounds, {writers} writers, seed {seed}")
    directory = tempfile.mkdtemp(prefix="protobase-crash-", dir=base)
    path = os.path.join(directory, "db")
    ack_paths = [os.path.join(directory, f"acks-{w}") for w in range(writers)]
    context = multiprocessing.get_context("spawn")
    outcome = Outcome(0, 0, 0, 0)
    try:
        for number in range(rounds):
            victim = VICTIMS[number % len(VICTIMS)] if number < len(VICTIMS) else rng.choice(VICTIMS)
            _round(context, path, ack_paths, victim, rng)
            outcome.kills += 1
            outcome.acknowledged, outcome.lost, outcome.half_applied = check(path, ack_paths)
            if outcome.lost or outcome.half_applied:
                log(f"round {number} ({victim}): LOST {outcome.lost}, half-applied {outcome.half_applied}")
                break
        _wait_unserved(path)
    finally:
        _kill_everything_serving(directory)
        shutil.rmtree(directory, ignore_errors=True)
    log(
        f"lost acknowledged commits: {outcome.lost}/{outcome.acknowledged} "
        f"(half-applied records: {outcome.half_applied}, kills: {outcome.kills})"
    )
    return outcome


def _round(context, path: str, ack_paths: list[str], victim: str, rng: random.Random) -> None:
    before = sum(len(acknowledged(p)) for p in ack_paths)
    processes = [context.Process(target=writer_main, args=(path, w, p), daemon=True) for w, p in enumerate(ack_paths)]
    for process in processes:
        process.start()
    try:
        target = before + rng.randint(1, 20)
        deadline = time.monotonic() + 60
        while sum(len(acknowledged(p)) for p in ack_paths) < target and time.monotonic() < deadline:
            if not any(process.is_alive() for process in processes):
                raise RuntimeError(f"every writer died before committing:\n{_evidence(path, ack_paths)}")
            time.sleep(0.005)
        coordinator, persistence = _server_pids(path)
        time.sleep(rng.uniform(0, 0.02))  # a random moment in the middle of commits
        if victim == "coordinator":
            _kill(coordinator)
        elif victim == "persistence":
            _kill(persistence)
        elif victim == "group":
            group = os.getpgid(coordinator)
            if group == os.getpgid(0):  # never our own group: the coordinator has its own session
                raise RuntimeError(f"coordinator {coordinator} is in the test's process group {group}")
            os.killpg(group, signal.SIGKILL)

        else:
            _kill(rng.choice(processes).pid)
    finally:
        for process in processes:
            _kill(process.pid)
            process.join(timeout=30)


def _evidence(path: str, ack_paths: list[str]) -> str:
    """The writers' last errors and the coordinator's log, for a failure report."""
    lines = []
    for ack_path in ack_paths:
        if os.path.exists(f"{ack_path}.errors"):
            with open(f"{ack_path}.errors") as file:
                lines += file.read().splitlines()[-2:]
    log_path = os.path.join(path, "coordinator.log")
    if os.path.exists(log_path):
        with open(log_path) as file:
            lines += ["coordinator.log:"] + file.read().splitlines()[-15:]
    return "\n".join(lines)


def _server_pids(path: str) -> tuple[int, int]:
    with protobase.open(path, shutdown_grace=GRACE) as db:
        stats = db.stats()
        return stats.coordinator_pid, stats.persistence_pid


def _kill(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_unserved(path: str) -> None:
    from protobase.core.datadir import DataDir

    if os.path.exists(os.path.join(path, "coordinator.lock")):
        DataDir(path).wait_until_unserved(30)


def _kill_everything_serving(directory: str) -> None:
    """End every process serving `directory` (ours), then remove what a killed coordinator left in /dev/shm."""
    for process in psutil.process_iter(["cmdline"]):
        if any(directory in part for part in process.info["cmdline"] or []):
            _kill(process.pid)
            try:
                process.wait(10)
            except psutil.Error:
                pass
    from protobase.core.datadir import DataDir
    from protobase.shm import names

    instance = DataDir(os.path.join(directory, "db")).read_instance() if os.path.isdir(directory) else None
    if instance and names.is_instance_id(instance):
        names.sweep(instance)  # no later start will, since the directory goes with us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.crash", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    outcome = run(args.rounds, args.writers, args.seed)
    return 1 if outcome.lost or outcome.half_applied else 0


if __name__ == "__main__":
    sys.exit(main())
