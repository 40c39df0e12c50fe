"""Interrupt test: SIGINT (Ctrl-C) and SIGKILL clients at random moments of their commits.

Clients append unique entries (their incarnation, a number) to one shared
list, each in a transaction retried on conflict, with durability="sync". The
runner sends SIGINT to a random client over and over, and now and then
SIGKILLs one (and starts another in its place). A client that is interrupted
resolves its transaction: "committed" or "aborted" as the handle knows it, or
`tx.outcome()` for a commit whose answer was still to come. Each client
reports, before each commit, the entry it tries, and after it the outcome,
and the runner checks the shared list at the end:

- every entry acknowledged (committed) is present, exactly once;
- no entry is present twice (a reply taken for another's would retry and
  apply it again);
- no entry reported as refused (aborted, conflicted) is present;
- every entry present was tried by a client.

Entries whose outcome was lost (OutcomeUnknownError, or a client killed
mid-commit) may be present or not, but at most once.

Run the long version with `python -m stress.interrupts --seconds 120`; the
default test suite runs a short one (tests/test_interrupts.py).
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
from dataclasses import dataclass, field

import protobase
from protobase.errors import ConflictError, DatabaseClosedError, OutcomeUnknownError
from stress.crash import _kill_everything_serving, _wait_unserved

GRACE = 0.2
ATTEMPTS = 100  # conflicts retried per entry before it is reported refused


_armed = False  # a SIGINT raises KeyboardInterrupt only while a commit runs


def _on_sigint(signum: int, frame: object) -> None:
    # A handler, not a signal mask: Python runs handlers between bytecodes, so a
    # KeyboardInterrupt can pre-empt the very call that would block SIGINT again,
    # and the client would go on unprotected. Clearing a flag is one store.
    if _armed:
        raise KeyboardInterrupt


def client_main(path: str, incarnation: int, report_path: str) -> None:
    """Append entries until SIGTERM; SIGINT may land anywhere inside a commit."""
    signal.signal(signal.SIGINT, _on_sigint)  # only commits are interrupted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    report = os.open(report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # it exists: we are ready
    with protobase.open(path, shutdown_grace=GRACE) as db:
        for number in range(sys.maxsize):
            entry = [incarnation, number]
            os.write(report, f"try {number}\n".encode())
            outcome = _commit_interruptibly(db, entry)
            os.write(report, f"{outcome} {number}\n".encode())  # one write: a kill leaves it whole or absent


def _commit_interruptibly(db: protobase.Database, entry: list) -> str:
    """ "acked", "refused" or "maybe": what became of the commit appending `entry`."""
    global _armed
    tx = None
    for _ in range(ATTEMPTS):
        try:
            _armed = True
            try:
                tx = db.transaction()
                tx.root["log"].append(entry)
                tx.commit()
            finally:
                _armed = False
            return "acked"
        except ConflictError:
            continue
        except KeyboardInterrupt:
            return _resolve(tx)
    return "refused"


def _resolve(tx: protobase.Transaction | None) -> str:
    """The outcome of an interrupted transaction (SIGINT is disarmed here)."""
    if tx is None or tx.state in ("active", "aborted"):
        if tx is not None:
            tx.abort()
        return "refused"
    if tx.state == "committed":
        return "acked"
    try:
        tx.outcome()
    except (ConflictError, DatabaseClosedError):
        return "refused"
    except OutcomeUnknownError:
        return "maybe"
    return "acked"


@dataclass
class Reports:
    """What the clients said, by entry (incarnation, number)."""

    tried: set = field(default_factory=set)
    acked: set = field(default_factory=set)
    refused: set = field(default_factory=set)

    def read(self, incarnation: int, report_path: str) -> None:
        if not os.path.exists(report_path):
            return
        with open(report_path) as file:
            for line in file.read().split("\n")[:-1]:  # a torn last line says nothing
                word, number = line.split()
                entry = (incarnation, int(number))
                {"try": self.tried, "acked": self.acked, "refused": self.refused}.get(word, set()).add(entry)


@dataclass
class Outcome:
    acknowledged: int = 0
    lost: int = 0  # acknowledged, not present
    duplicated: int = 0  # present more than once
    refused_applied: int = 0  # reported refused, yet present
    untried: int = 0  # present, yet no client tried it
    interrupts: int = 0
    kills: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.refused_applied or self.untried)


def run(
    seconds: float,
    clients: int = 3,
    kill_every: int = 15,
    seed: int | None = None,
    base: str | None = None,
    log=print,
    at_least: int = 0,
) -> Outcome:
    """Interrupt clients for `seconds`, and on while fewer than `at_least` commits are acknowledged (up to five
    times as long: a loaded machine commits slower); return what the check found."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    log(f"interrupt test: {seconds}s, {clients} clients, a SIGKILL every {kill_every} signals, seed {seed}")
    directory = tempfile.mkdtemp(prefix="protobase-interrupts-", dir=base)
    path = os.path.join(directory, "db")
    context = multiprocessing.get_context("spawn")
    outcome = Outcome()
    incarnations = 0
    running: dict[int, multiprocessing.process.BaseProcess] = {}  # {incarnation -> its process}

    def start() -> None:
        nonlocal incarnations
        process = context.Process(
            target=client_main, args=(path, incarnations, _report(directory, incarnations)), daemon=True
        )
        process.start()
        running[incarnations] = process
        incarnations += 1

    def interrupt_for(duration: float) -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.0005, 0.01))
            incarnation = rng.choice(list(running))
            process = running[incarnation]
            if not process.is_alive():
                raise RuntimeError(f"client {incarnation} died by itself (exit code {process.exitcode})")
            if not os.path.exists(_report(directory, incarnation)):
                continue  # still starting: a SIGINT now would stop it before it can handle one
            if rng.randrange(kill_every) == 0:
                process.kill()
                process.join(30)
                del running[incarnation]
                outcome.kills += 1
                start()
            else:
                os.kill(process.pid, signal.SIGINT)
                outcome.interrupts += 1

    try:
        with protobase.open(path, shutdown_grace=GRACE) as db, db.transaction() as tx:
            tx.root["log"] = []
        for _ in range(clients):
            start()
        interrupt_for(seconds)
        for _ in range(int(4 * seconds)):
            if len(_reports(directory, incarnations).acked) >= at_least:
                break
            interrupt_for(1.0)
        for process in running.values():
            process.terminate()
            process.join(60)
            if process.is_alive():
                process.kill()
                process.join(30)
        _check(path, directory, incarnations, outcome)
        _wait_unserved(path)
    finally:
        for process in running.values():
            if process.is_alive():
                process.kill()
        _kill_everything_serving(directory)
        shutil.rmtree(directory, ignore_errors=True)
    log(
        f"lost acknowledged commits: {outcome.lost}/{outcome.acknowledged} (applied twice: {outcome.duplicated}, "
        f"refused but applied: {outcome.refused_applied}, never tried: {outcome.untried}; "
        f"SIGINTs: {outcome.interrupts}, kills: {outcome.kills})"
    )
    return outcome


def _report(directory: str, incarnation: int) -> str:
    return os.path.join(directory, f"client-{incarnation}")


def _reports(directory: str, incarnations: int) -> Reports:
    """What every client incarnation has reported so far."""
    reports = Reports()
    for incarnation in range(incarnations):
        reports.read(incarnation, _report(directory, incarnation))
    return reports


def _check(path: str, directory: str, incarnations: int, outcome: Outcome) -> None:
    reports = _reports(directory, incarnations)
    with protobase.open(path, shutdown_grace=GRACE) as db:
        with db.snapshot() as snap:
            present = [tuple(entry) for entry in snap.root["log"]]
        db.check()
    unique = set(present)
    outcome.acknowledged = len(reports.acked)
    outcome.lost = len(reports.acked - unique)
    outcome.duplicated = len(present) - len(unique)
    outcome.refused_applied = len(reports.refused & unique)
    outcome.untried = len(unique - reports.tried)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.interrupts", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--kill-every", type=int, default=15, help="one signal in N is a SIGKILL")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    return 0 if run(args.seconds, args.clients, args.kill_every, args.seed).ok else 1


if __name__ == "__main__":
    sys.exit(main())
