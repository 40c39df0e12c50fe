"""`protobase demo`: several processes sharing one database, end to end.

A bank of accounts in a temporary directory: writer processes move money
between random accounts in retried transactions, a reader process audits
consistent snapshots at RAM speed, and at the end the invariant (total
balance unchanged) is checked and a few figures printed. Everything it
starts, it stops; the directory is removed.
"""

from __future__ import annotations

import multiprocessing
import random
import shutil
import tempfile
import time
from typing import Any

import protobase

ACCOUNTS = 200
OPENING_BALANCE = 1_000


def transfer_worker(path: str, worker: int, transfers: int, results: Any) -> None:
    """Move random amounts between random accounts; report commits and conflicts."""
    rng = random.Random(worker)
    conflicts = 0
    with protobase.open(path) as db:
        started = time.perf_counter()
        for _ in range(transfers):
            source, target = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 50)
            for attempt in db.attempts(retries=50):
                with attempt as tx:
                    accounts = tx.root["accounts"]
                    accounts[f"acct{source}"]["balance"] -= amount
                    accounts[f"acct{target}"]["balance"] += amount
                    tx.root["transfers"][f"w{worker}"] += 1
                if not attempt.committed:
                    conflicts += 1
        results.put(("writer", worker, transfers, conflicts, time.perf_counter() - started))


def audit_worker(path: str, stop: Any, results: Any) -> None:
    """Audit snapshots until told to stop: every snapshot must balance."""
    audits = reads = 0
    unbalanced = 0
    with protobase.open(path) as db:
        started = time.perf_counter()
        while not stop.is_set() or audits == 0:
            with db.snapshot() as snap:
                accounts = snap.root["accounts"]
                total = sum(accounts[f"acct{i}"]["balance"] for i in range(ACCOUNTS))
                reads += ACCOUNTS
                audits += 1
                unbalanced += total != ACCOUNTS * OPENING_BALANCE
        results.put(("auditor", audits, reads, unbalanced, time.perf_counter() - started))


def run(writers: int = 3, transfers: int = 300) -> int:
    """Run the demo; return a process exit status (0 when every check held)."""
    directory = tempfile.mkdtemp(prefix="protobase-demo-")
    path = f"{directory}/bank"
    print(f"ProtoBase demo: {writers} writer processes and 1 auditor share {path}")
    try:
        with protobase.open(path, shutdown_grace=0.2) as db:
            with db.transaction() as tx:
                tx.root["accounts"] = {
                    f"acct{i}": {"owner": f"customer {i}", "balance": OPENING_BALANCE} for i in range(ACCOUNTS)
                }
                tx.root["transfers"] = {f"w{w}": 0 for w in range(writers)}
            print(f"  opened {ACCOUNTS} accounts of {OPENING_BALANCE} each (commit {tx.seq})")
            status = _run_workers(db, path, writers, transfers)
            _report_final_state(db, writers, transfers)
        db.datadir.wait_until_unserved()
        return status
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run_workers(db: protobase.Database, path: str, writers: int, transfers: int) -> int:
    context = multiprocessing.get_context("spawn")
    results, stop = context.Queue(), context.Event()
    processes = [context.Process(target=transfer_worker, args=(path, w, transfers, results)) for w in range(writers)]
    auditor = context.Process(target=audit_worker, args=(path, stop, results))
    started = time.perf_counter()
    for process in [auditor, *processes]:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    elapsed = time.perf_counter() - started
    stop.set()
    audit = results.get(timeout=60)
    for process in [auditor, *processes]:
        process.join(timeout=60)
    status = 0
    for _, worker, done, conflicts, seconds in sorted(outcomes):
        print(f"  writer {worker}: {done} transfers in {seconds:.2f}s, {conflicts} conflicts retried")
    commits = writers * transfers
    print(f"  all writers: {commits} commits in {elapsed:.2f}s ({commits / elapsed:,.0f} commits/s)")
    _, audits, reads, unbalanced, seconds = audit
    print(
        f"  auditor: {audits} consistent snapshots, {reads:,} record reads "
        f"({reads / seconds:,.0f} reads/s), {unbalanced} unbalanced"
    )
    if unbalanced or any(p.exitcode for p in [auditor, *processes]):
        status = 1
    return status


def _report_final_state(db: protobase.Database, writers: int, transfers: int) -> None:
    with db.snapshot() as snap:
        total = sum(account["balance"] for account in snap.root["accounts"].values())
        done = sum(snap.root["transfers"].values())
    db.check()
    stats = db.stats()
    print(
        f"  final: total balance {total:,} (expected {ACCOUNTS * OPENING_BALANCE:,}), "
        f"{done} transfers recorded (expected {writers * transfers})"
    )
    print(
        f"  database: seq {stats.seq}, {stats.segments} segment(s), {stats.shared_bytes:,} shared bytes, "
        f"{stats.conflicts} conflicts seen by the coordinator; check() passed"
    )
    if total != ACCOUNTS * OPENING_BALANCE or done != writers * transfers:
        raise SystemExit("demo FAILED: an invariant did not hold")
    print("demo OK: no update lost, every snapshot consistent")
