"""The timed loops of `python -m benchmarks suite`, identical for every store.

Each runs in worker processes (spawned), built from a store's picklable spec:
`run_workers` starts them, waits until every one has connected and warmed up,
releases them at once, and collects what each measured. Loops are bounded by
time (a few seconds), not by count, so slow stores do not stretch the run.
"""

from __future__ import annotations

import gc
import random
import time
from typing import Any

from .adapters import load_store
from .common import released_worker, run_released_together
from .queries import PAIRS

__all__ = ["run_workers", "TASKS"]

READY_TIMEOUT = 600.0  # seconds a worker may take to connect and warm up
EXIT_TIMEOUT = 60.0
CHUNK = 500  # operations between two looks at the clock


def _reads(
    client: Any, start: Any, records: int, seconds: float, repeats: int, warm_seconds: float, seed: int, **_: Any
) -> dict:
    """Warm random point reads: `repeats` passes of `seconds` each; ops/s of each pass."""
    rng = random.Random(seed)
    sample = [f"user{rng.randrange(records)}" for _ in range(max(records, CHUNK))]
    get = client.get
    deadline = time.perf_counter() + warm_seconds
    warmed = 0
    for i in range(records):  # warm-up: every record once, within the budget
        get(f"user{i}")
        warmed += 1
        if i % CHUNK == 0 and time.perf_counter() > deadline:
            break
    if get("user0")["id"] != 0:
        raise AssertionError("user0 read back wrong")
    yield {"warmed": warmed}
    rates = []
    position = 0
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            done = 0
            began = time.perf_counter()
            end = began + seconds
            now = began
            while now < end:
                for key in sample[position : position + CHUNK]:
                    get(key)
                done += CHUNK
                position = (position + CHUNK) % (len(sample) - CHUNK + 1)
                now = time.perf_counter()
        finally:
            gc.enable()
        rates.append(done / (now - began))
    yield {"rates": rates, "warmed": warmed}


def _commits(client: Any, start: Any, client_id: int, seconds: float, rate: float | None, **_: Any) -> dict:
    """Single-key commits for `seconds`: closed loop, or paced at `rate` commits/s (steady load)."""
    put = client.put
    for i in range(20):  # warm-up
        put(f"w3-{client_id}-{i}", {"id": -1, "name": "w3", "city": "w3", "score": i, "tags": []})
    yield {}
    latencies = []
    retries = 0
    clock = time.perf_counter
    began = clock()
    end = began + seconds
    i = 0
    now = began
    while now < end:
        if rate:
            due = began + i / rate
            if due > now:
                time.sleep(due - now)
        started = clock()
        retries += put(
            f"w3-{client_id}-{i % 1000}", {"id": -1, "name": "w3", "city": "w3", "score": i % 1000, "tags": []}
        )
        now = clock()
        latencies.append(now - started)
        i += 1
    yield {"commits": i, "seconds": now - began, "latencies": latencies, "retries": retries}


def _transfers(client: Any, start: Any, client_id: int, seconds: float, accounts: int, seed: int, **_: Any) -> dict:
    """Transfers between random accounts for `seconds`: commits and the retries they needed."""
    rng = random.Random(seed + client_id)
    transfer = client.transfer
    yield {}
    clock = time.perf_counter
    began = clock()
    end = began + seconds
    commits = retries = 0
    now = began
    while now < end:
        a = rng.randrange(accounts)
        b = (a + 1 + rng.randrange(accounts - 1)) % accounts
        retries += transfer(f"acct{a}", f"acct{b}", rng.randint(1, 10))
        commits += 1
        now = clock()
    yield {"commits": commits, "seconds": now - began, "retries": retries}


def _query(client: Any, start: Any, repeats: int, seconds: float, **_: Any) -> dict:
    """`city == X and score > Y` for each pair: median seconds of up to `repeats` runs within a budget."""
    first = {pair: client.query(*pair) for pair in PAIRS}  # warm-up, and the result to check
    yield {}
    times: dict[str, list[float]] = {}
    for pair in PAIRS:
        runs = times.setdefault(f"{pair[0]}>{pair[1]}", [])
        budget = time.perf_counter() + seconds
        while len(runs) < repeats and (not runs or time.perf_counter() < budget):
            began = time.perf_counter()
            client.query(*pair)
            runs.append(time.perf_counter() - began)
    yield {"times": times, "ids": {f"{p[0]}>{p[1]}": sorted(r["id"] for r in rows) for p, rows in first.items()}}


def _memory(client: Any, start: Any, records: int, uss_before: int, **_: Any) -> dict:
    """USS of a reader: before connecting, then after reading every record once."""
    from protobase.client.stats import process_uss

    yield {}
    began = time.perf_counter()
    get = client.get
    for i in range(records):
        get(f"user{i}")
    seconds = time.perf_counter() - began
    gc.collect()
    yield {"uss_before": uss_before, "uss_after": process_uss(), "seconds": seconds}


TASKS = {"reads": _reads, "commits": _commits, "transfers": _transfers, "query": _query, "memory": _memory}


@released_worker
def _worker(
    conn: Any, start: Any, store: tuple[str, str], spec: dict, mode: str, task: str, client_id: int, kwargs: dict
) -> Any:
    from protobase.client.stats import process_uss

    gc.collect()
    uss_before = process_uss()
    client = load_store(*store).connect(spec, mode)
    try:
        steps = TASKS[task](client, start, client_id=client_id, uss_before=uss_before, **kwargs)
        conn.send(("ready", next(steps)))
        if not start.wait(READY_TIMEOUT):
            raise RuntimeError("the round never started")
        result = next(steps)
    finally:
        client.close()
    return result


def run_workers(
    store: tuple[str, str], spec: dict, mode: str, task: str, processes: int, timeout: float, **kwargs: Any
) -> list[dict]:
    """Run `task` in `processes` spawned workers released together; their results. Always joins them."""
    return run_released_together(
        _worker,
        [(store, spec, mode, task, client_id, kwargs) for client_id in range(processes)],
        [f"suite-{store[1]}-{task}-{client_id}" for client_id in range(processes)],
        READY_TIMEOUT,
        timeout,
        EXIT_TIMEOUT,
    )
