"""The comparison suite: `python -m benchmarks suite [--quick] [--records N] [--no-doc]`.

Runs the same workloads (benchmarks/workloads.py) against every store of
benchmarks/adapters, one store at a time, ProtoBase first, and reports every
figure beside its ratio to ProtoBase measured in this run:

* W1 warm random point reads of `--records` records (the record of
  benchmarks/queries.py: {"id", "name", "city", "score", "tags"}), one reader
  process, returning Python objects; median of the passes;
* W2 the same from 2 and 4 reader processes at once (aggregate ops/s);
* W3 single-key commits, durable (fsync before the commit returns) and
  relaxed, from 1 and 2 client processes; then a steady load (one client
  paced at half its closed-loop rate, at most 500/s) for p50/p99/p99.9;
* W4 transfers between 100 accounts (read 2, write 2) from 2 processes,
  durable where the store has it: commits/s, retries, and the invariant
  (total balance unchanged) checked at the end;
* W5 `city == X and score > Y` with each store's best method, the results
  checked against ProtoBase's;
* W6 memory after loading `--memory-records` records: bytes the store holds
  (shared memory or the server's data), USS of its server process, USS growth
  of one more reader that reads every record once, disk bytes, load time.

A store that cannot run here (missing package or binary) is listed as
SKIPPED with the reason; a workload that fails is listed with its error. The
runner stops everything it started (servers, workers, shared memory segments,
temporary directories) and says so at the end. The report is printed and
written into docs/benchmarks.md between `<!-- suite:begin -->` and
`<!-- suite:end -->`, with PNG plots in docs/img/.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from .adapters import STORES, load_store
from .common import machine, median, percentile, replace_section, temporary_directory
from .durability import filesystem_of, leaked_shared_memory
from .queries import make_records
from .workloads import run_workers

__all__ = ["run", "DOC", "FULL", "QUICK"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")
SEED = 20240601
ACCOUNTS, BALANCE = 100, 1000
LATENCY_RATE_CAP = 500.0

FULL = {
    "records": 100_000,
    "memory_records": 200_000,
    "seconds": 1.0,
    "repeats": 5,
    "warm_seconds": 4.0,
    "commit_seconds": 2.0,
    "latency_seconds": 4.0,
    "transfer_seconds": 3.0,
    "query_seconds": 2.0,
}
QUICK = {
    "records": 20_000,
    "memory_records": 20_000,
    "seconds": 0.4,
    "repeats": 3,
    "warm_seconds": 1.0,
    "commit_seconds": 0.7,
    "latency_seconds": 1.0,
    "transfer_seconds": 1.0,
    "query_seconds": 0.5,
}


def _log(message: str) -> None:
    print(f"[suite] {message}", flush=True)


def _attempt(results: dict, key: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one workload; record its error instead of stopping the suite."""
    try:
        value = function(*args, **kwargs)
    except Exception as error:  # a store failing a workload is a result, not a crash
        last = traceback.format_exc().strip().splitlines()[-1]
        results[key] = {"error": last[:300]}
        _log(f"  {key}: FAILED {last[:300]}")
        if not isinstance(error, (RuntimeError, AssertionError, OSError, ImportError)):
            _log(traceback.format_exc())
        return None
    results[key] = value
    return value


# -- one store --------------------------------------------------------------------------------


def bench_store(ref: tuple[str, str], cls: Any, tmp: str, cfg: dict) -> dict:
    """W1-W5 on one store; returns {workload key: result or {"error"}}."""
    results: dict[str, Any] = {}
    store = cls()
    store.seed, store.tmp = SEED, tmp
    records = make_records(cfg["records"], SEED)
    try:
        store.start(tmp)  # inside: a store that fails half-way through starting is stopped too
        began = time.perf_counter()
        store.load(records)
        results["load_seconds"] = time.perf_counter() - began
        if store.transfers:
            store.setup_accounts(ACCOUNTS, BALANCE)
        del records
        spec = store.spec()
        timeout = 600.0
        read_args = {
            "records": cfg["records"],
            "seconds": cfg["seconds"],
            "repeats": cfg["repeats"],
            "warm_seconds": cfg["warm_seconds"],
            "seed": SEED,
        }

        def reads(processes: int) -> dict:
            out = run_workers(ref, spec, "relaxed", "reads", processes, timeout, **read_args)
            per_repeat = [sum(rates) for rates in zip(*(o["rates"] for o in out))]
            return {"rate": median(per_repeat), "warmed": min(o["warmed"] for o in out)}

        _log(f"{store.name}: W1 reads")
        _attempt(results, "W1", reads, 1)
        if store.processes or cls.__name__ == "PlainDict":
            for n in (2, 4):
                _log(f"{store.name}: W2 reads x{n}")
                _attempt(results, f"W2x{n}", reads, n)

        _log(f"{store.name}: W5 query")

        def query() -> dict:
            (out,) = run_workers(
                ref, spec, "relaxed", "query", 1, timeout, repeats=cfg["repeats"], seconds=cfg["query_seconds"]
            )
            return {
                "seconds": sum(median(t) for t in out["times"].values()),
                "ids": out["ids"],
                "matches": sum(len(ids) for ids in out["ids"].values()),
            }

        _attempt(results, "W5", query)

        def commits(mode: str, clients: int, rate: float | None, seconds: float) -> dict:
            store.set_mode(mode)
            out = run_workers(ref, spec, mode, "commits", clients, timeout, seconds=seconds, rate=rate)
            lat = [x for o in out for x in o["latencies"]]
            return {
                "rate": sum(o["commits"] / o["seconds"] for o in out),
                "latencies": lat,
                "p50": percentile(lat, 0.5),
                "p99": percentile(lat, 0.99),
                "p999": percentile(lat, 0.999),
                "paced": rate,
            }

        for mode in store.modes:
            for clients in (1, 2) if store.processes else (1,):
                _log(f"{store.name}: W3 {mode} x{clients}")
                _attempt(results, f"W3 {mode} x{clients}", commits, mode, clients, None, cfg["commit_seconds"])
            closed = results.get(f"W3 {mode} x1", {})
            if "rate" in closed:
                rate = min(LATENCY_RATE_CAP, closed["rate"] / 2)
                _log(f"{store.name}: latency {mode} at {rate:,.0f}/s")
                _attempt(results, f"LAT {mode}", commits, mode, 1, rate, cfg["latency_seconds"])

        if store.transfers:
            mode = "durable" if "durable" in store.modes else "relaxed"
            _log(f"{store.name}: W4 transfers ({mode})")

            def transfers() -> dict:
                store.set_mode(mode)
                out = run_workers(
                    ref,
                    spec,
                    mode,
                    "transfers",
                    2,
                    timeout,
                    seconds=cfg["transfer_seconds"],
                    accounts=ACCOUNTS,
                    seed=SEED,
                )
                checker = cls.connect(spec, mode)
                try:
                    total = checker.total(ACCOUNTS)
                finally:
                    checker.close()
                return {
                    "rate": sum(o["commits"] / o["seconds"] for o in out),
                    "mode": mode,
                    "commits": sum(o["commits"] for o in out),
                    "retries": sum(o["retries"] for o in out),
                    "total": total,
                    "expected": ACCOUNTS * BALANCE,
                }

            _attempt(results, "W4", transfers)
    finally:
        store.stop()
    return results


def bench_memory(ref: tuple[str, str], cls: Any, tmp: str, records_count: int) -> dict:
    """W6: load `records_count` records, measure what the store holds and what one more reader costs."""
    from protobase.client.stats import process_uss

    store = cls()
    store.seed, store.tmp = SEED, tmp
    records = make_records(records_count, SEED)
    try:
        store.start(tmp)
        began = time.perf_counter()
        store.load(records)
        load_seconds = time.perf_counter() - began
        del records
        info = store.info()
        server_uss = process_uss(info["server_pid"]) if info.get("server_pid") else None
        (reader,) = run_workers(ref, store.spec(), "relaxed", "memory", 1, 1800.0, records=records_count)
    finally:
        store.stop()
    return {
        "load_seconds": load_seconds,
        "held": info.get("shared"),
        "server_uss": server_uss,
        "reader_growth": reader["uss_after"] - reader["uss_before"],
        "reader_seconds": reader["seconds"],
        "disk": info.get("disk"),
    }


# -- the report ---------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):,.1f} MiB"


def _cell(result: Any, field: str, reference: Any, fmt: Any = _num, lower_is_better: bool = False) -> str:
    """`value (ratio to ProtoBase)`; n/a when not run, the error when it failed."""
    if result is None:
        return "n/a"
    if "error" in result:
        return "failed"
    value = result[field]
    text = fmt(value)
    if reference and "error" not in reference and reference.get(field):
        ratio = value / reference[field]
        text += f" ({ratio:.2f}x)"
    return text


def report(
    command: str,
    info: dict,
    cfg: dict,
    results: dict,
    memory: dict,
    skipped: dict,
    cleanup: list,
    filesystem: str,
    elapsed: float,
) -> str:
    pb = results.get("ProtoBase", {})
    pbm = memory.get("ProtoBase")
    ran = [name for name in results]
    lines = [
        f"Command: `{command}`  ",
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"load average at start {info['load']}; temporary files on {filesystem}. Whole run: {elapsed / 60:.1f} min.",
        "",
        f"Records: {cfg['records']:,} for W1-W5, {cfg['memory_records']:,} for W6. In parentheses: the ratio "
        "to ProtoBase in this run (above 1.00x the other store is faster, for W5 and W6 slower/bigger).",
        "",
    ]
    if skipped:
        lines += ["**Skipped:** " + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()), ""]
    lines += [
        "### W1, W2: warm random point reads (ops/s, aggregate over reader processes)",
        "",
        "| store | how | 1 reader | 2 readers | 4 readers |",
        "|---|---|---:|---:|---:|",
    ]
    for name in ran:
        r = results[name]
        lines.append(
            f"| {name} | {r['_method']} | "
            + " | ".join(_cell(r.get(k), "rate", pb.get(k)) for k in ("W1", "W2x2", "W2x4"))
            + " |"
        )
    lines += [
        "",
        "### W3: single-key commits (commits/s, aggregate over client processes)",
        "",
        "| store | durable, 1 client | durable, 2 clients | relaxed, 1 client | relaxed, 2 clients |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ran:
        r = results[name]
        lines.append(
            f"| {name} | "
            + " | ".join(
                _cell(r.get(f"W3 {m} x{c}"), "rate", pb.get(f"W3 {m} x{c}"))
                for m in ("durable", "relaxed")
                for c in (1, 2)
            )
            + " |"
        )
    lines += [
        "",
        "### Commit latency under a steady load (one client paced at half its closed-loop rate, "
        f"at most {LATENCY_RATE_CAP:.0f}/s)",
        "",
        "| store | mode | paced at | p50 | p99 | p99.9 | commits |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ran:
        for mode in ("durable", "relaxed"):
            r = results[name].get(f"LAT {mode}")
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {name} | {mode} | failed | | | | |")
                continue
            ref = pb.get(f"LAT {mode}") or {}
            cells = []
            for q in ("p50", "p99", "p999"):
                text = f"{r[q] * 1e6:,.0f} µs"
                if ref.get(q):
                    text += f" ({r[q] / ref[q]:.2f}x)"
                cells.append(text)
            lines.append(
                f"| {name} | {mode} | {r['paced']:,.0f}/s | " + " | ".join(cells) + f" | {len(r['latencies']):,} |"
            )
    lines += [
        "",
        f"### W4: transfers between {ACCOUNTS} accounts from 2 processes (read 2 keys, write 2)",
        "",
        "| store | mode | commits/s | retries | retries per commit | invariant (total balance) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name in ran:
        r = results[name].get("W4")
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error']} | | | |")
            continue
        ok = "held" if r["total"] == r["expected"] else f"**BROKEN: {r['total']:,} != {r['expected']:,}**"
        lines.append(
            f"| {name} | {r['mode']} | {_cell(r, 'rate', pb.get('W4'))} | {r['retries']:,} | "
            f"{r['retries'] / max(1, r['commits']):.3f} | {ok} ({r['total']:,}) |"
        )
    lines += [
        "",
        "### W5: `city == X and score > Y`, three (X, Y) pairs, records returned as Python objects",
        "",
        "| store | method | time for the 3 queries | matches | same records as ProtoBase |",
        "|---|---|---:|---:|---|",
    ]
    reference_ids = (pb.get("W5") or {}).get("ids")
    for name in ran:
        r = results[name]
        w5 = r.get("W5")
        if not w5:
            continue
        if "error" in w5:
            lines.append(f"| {name} | {r['_query']} | failed: {w5['error']} | | |")
            continue
        same = "n/a" if reference_ids is None else "yes" if w5["ids"] == reference_ids else "**no**"
        lines.append(
            f"| {name} | {r['_query']} | "
            f"{_cell(w5, 'seconds', pb.get('W5'), lambda s: f'{s * 1000:,.2f} ms')} | "
            f"{w5['matches']:,} | {same} |"
        )
    lines += [
        "",
        f"### W6: memory and load time, {cfg['memory_records']:,} records",
        "",
        "| store | load time | held by the store (shared memory / server data) | server USS | "
        "one more reader: USS growth | its read of every record | disk |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in memory.items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error']} | | | | | |")
            continue

        def ratio(field: str, m: dict = m) -> str:
            if m.get(field) is None:
                return "n/a"
            text = _mib(m[field]) if field != "load_seconds" else f"{m[field]:,.1f} s"
            if pbm and "error" not in pbm and pbm.get(field):
                text += f" ({m[field] / pbm[field]:.2f}x)"
            return text

        lines.append(
            f"| {name} | {ratio('load_seconds')} | {ratio('held')} | {ratio('server_uss')} | "
            f"{ratio('reader_growth')} | {m['reader_seconds']:.1f} s | {ratio('disk')} |"
        )
    lines += [
        "",
        "Cleanup after the run: "
        + (
            "; ".join(cleanup)
            if cleanup
            else "every server, worker, shared memory segment and temporary directory the suite started was gone."
        ),
    ]
    return "\n".join(lines) + "\n"


def plots(results: dict, memory: dict) -> list[str]:
    """PNG plots in docs/img/; the files written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(IMG, exist_ok=True)
    written = []
    panels = [
        ("W1 reads/s, 1 reader", "W1"),
        ("W3 durable commits/s, 1 client", "W3 durable x1"),
        ("W3 relaxed commits/s, 1 client", "W3 relaxed x1"),
        ("W4 transfers/s, 2 processes", "W4"),
        ("W5 queries/s (3-query rounds)", "W5"),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)))
    for axis, (title, key) in zip(axes, panels):
        names, values = [], []
        for name, r in results.items():
            value = r.get(key)
            if value and "error" not in value:
                names.append(name)
                values.append(1 / value["seconds"] if key == "W5" else value["rate"])
        colors = ["tab:red" if n == "ProtoBase" else "tab:blue" for n in names]
        axis.barh(names[::-1], values[::-1], color=colors[::-1])
        axis.set_xscale("log")
        axis.set_title(title)
        axis.tick_params(labelsize=8)
    figure.tight_layout()
    path = os.path.join(IMG, "benchmarks-throughput.png")
    figure.savefig(path, dpi=90)
    plt.close(figure)
    written.append(path)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        points = [
            (n, r[k]["rate"]) for n, k in ((1, "W1"), (2, "W2x2"), (4, "W2x4")) if r.get(k) and "error" not in r[k]
        ]
        if len(points) > 1:
            axis.plot(*zip(*points), marker="o", label=name, linewidth=3 if name == "ProtoBase" else 1)
    axis.set_xlabel("reader processes (2 CPUs)")
    axis.set_ylabel("reads/s, aggregate")
    axis.set_yscale("log")
    axis.set_xticks([1, 2, 4])
    axis.legend(fontsize=7)
    axis.set_title("Read scaling with processes (W1, W2)")
    figure.tight_layout()
    path = os.path.join(IMG, "benchmarks-read-scaling.png")
    figure.savefig(path, dpi=90)
    plt.close(figure)
    written.append(path)
    return written


# -- the run ----------------------------------------------------------------------------------


def _own_shm_entries() -> list[str]:
    from .adapters.msgpack_shm import PREFIX

    ours = [PREFIX.lstrip("/"), f"pbbench{os.getpid()}"]
    return [entry for entry in os.listdir("/dev/shm") if any(entry.startswith(p) for p in ours)]


def run(*, cfg: dict, only: list[str] | None, command: str, doc: str | None, memory: bool = True) -> int:
    info = machine()
    started = time.perf_counter()
    results: dict[str, dict] = {}
    mem: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    _log(
        f"{len(STORES)} stores, {cfg['records']:,} records (W6: {cfg['memory_records']:,}); "
        f"{info['nproc']} CPUs, load {info['load']}"
    )
    with temporary_directory("protobase-suite-") as tmp:
        os.chmod(tmp, 0o700)
        filesystem = filesystem_of(tmp)
        stores = []
        for ref in STORES:
            try:
                cls = load_store(*ref)
            except ImportError as error:
                skipped[ref[1]] = f"cannot import its adapter: {error}"
                continue
            if only and cls.name not in only and ref[1] not in only:
                continue
            reason = cls().unavailable()
            if reason:
                skipped[cls.name] = reason
                _log(f"{cls.name}: SKIPPED ({reason})")
                continue
            stores.append((ref, cls))
        for index, (ref, cls) in enumerate(stores):
            subdir = os.path.join(tmp, f"{index:02d}-{ref[1].lower()}")
            os.mkdir(subdir)
            try:
                results[cls.name] = bench_store(ref, cls, subdir, cfg)
            except Exception:  # the store could not start or load: a result too
                last = traceback.format_exc().strip().splitlines()[-1]
                skipped[cls.name] = f"failed to start or load: {last[:300]}"
                _log(f"{cls.name}: FAILED {traceback.format_exc()}")
                continue
            results[cls.name]["_method"] = cls.method
            results[cls.name]["_query"] = cls.query_method
        if memory:
            for index, (ref, cls) in enumerate(stores):
                if cls.name not in results:
                    continue
                _log(f"{cls.name}: W6 memory, {cfg['memory_records']:,} records")
                subdir = os.path.join(tmp, f"m{index:02d}-{ref[1].lower()}")
                os.mkdir(subdir)
                _attempt(mem, cls.name, bench_memory, ref, cls, subdir, cfg["memory_records"])
    cleanup = []
    leaked = leaked_shared_memory() + _own_shm_entries()
    if leaked:
        cleanup.append(f"LEAKED /dev/shm entries: {leaked}")
    elapsed = time.perf_counter() - started
    text = report(command, info, cfg, results, mem, skipped, cleanup, filesystem, elapsed)
    print()
    print(text)
    if doc:
        images = plots(results, mem)
        body = text + "".join(f"\n![{os.path.basename(p)}](img/{os.path.basename(p)})\n" for p in images)
        replace_section(doc, "suite", body)
        print(f"written to {doc}" + (f" and {', '.join(images)}" if images else ""))
    return 1 if leaked else 0
