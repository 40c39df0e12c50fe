"""The runnable examples in examples/, each run as its users would run it, under a small real load.

Each test starts the example as a subprocess (gunicorn, or `python -m`),
drives it, and checks its invariant from outside: no cart add or score point
lost behind gunicorn, pool totals equal to a single pass over the same
snapshot, every telemetry event aggregated exactly once. The datadir fixture
then checks that the coordinator exited.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import GRACE, open_test_db, wait_for_coordinator_exit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_TIMEOUT = 240  # seconds a `python -m examples...` run may take on a loaded machine


def run_example(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m examples.<module> args` from the repository root; fail with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", f"examples.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
    )
    assert done.returncode == 0, f"examples.{module} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    print(done.stdout)
    return done


# -- the gunicorn shop ----------------------------------------------------------------------

USERS = [f"user{number}" for number in range(4)]  # few users: adds to one cart contend
CLIENT_THREADS = 6
REQUESTS_PER_THREAD = 30
HTTP_TIMEOUT = 60.0
SERVER_START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(base: str, method: str, path: str) -> tuple[dict, str]:
    """One request; (JSON body, serving worker's pid). Any non-200 fails the test."""
    request = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200, (method, path, response.status)
        return json.loads(response.read()), response.headers["X-Worker-Pid"]


def wait_until_serving(server: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        assert server.poll() is None, f"gunicorn exited with {server.returncode} before serving"
        try:
            call(base, "GET", "/health")
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM the gunicorn master we started (it stops its workers); SIGKILL its group if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)  # its own group: start_new_session=True
        server.wait()


def client(base: str, thread: int, sent: dict, pids: collections.Counter, errors: list) -> None:
    """Add unique items to the shared carts and points to the shared scores; record what was sent."""
    try:
        for number in range(REQUESTS_PER_THREAD):
            user = USERS[(thread + number) % len(USERS)]
            if number % 2 == 0:
                item = f"t{thread}-i{number}"
                _, pid = call(base, "POST", f"/cart/{user}/add?item={item}")
                sent["items"].append((user, item))
            else:
                points = thread * 10 + number
                _, pid = call(base, "POST", f"/score/{user}?points={points}")
                sent["points"].append((user, points))
            pids[pid] += 1
    except BaseException as error:  # noqa: BLE001 - reported by the main thread
        errors.append(error)


@pytest.mark.skipif(
    importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed: pip install -e '.[examples]'"
)
def test_shop_app_under_gunicorn_loses_no_update(datadir, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PROTOBASE_PATH=datadir, PROTOBASE_SHUTDOWN_GRACE=str(GRACE))
    log = open(tmp_path / "gunicorn.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "3",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            "examples.shop_app:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_serving(server, base)
        sent: dict = {"items": [], "points": []}  # list.append is atomic across threads
        pids: collections.Counter = collections.Counter()
        errors: list = []
        threads = [
            threading.Thread(target=client, args=(base, number, sent, pids, errors)) for number in range(CLIENT_THREADS)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=HTTP_TIMEOUT * REQUESTS_PER_THREAD)
        elapsed = time.perf_counter() - started
        assert not any(thread.is_alive() for thread in threads), "a client thread hung"
        assert not errors, errors
        requests = CLIENT_THREADS * REQUESTS_PER_THREAD
        print(
            f"\n{requests} updates in {elapsed:.2f}s = {requests / elapsed:.0f} requests/s, "
            f"served by workers {dict(pids)}"
        )

        carts = {user: call(base, "GET", f"/cart/{user}")[0]["items"] for user in USERS}
        expected_carts = collections.defaultdict(list)
        for user, item in sent["items"]:
            expected_carts[user].append(item)
        for user in USERS:
            assert collections.Counter(carts[user]) == collections.Counter(expected_carts[user]), user
        board = call(base, "GET", f"/leaderboard?top={len(USERS)}&explain=1")[0]
        expected_scores = collections.Counter()
        for user, points in sent["points"]:
            expected_scores[user] += points
        assert {row["user"]: row["score"] for row in board["leaderboard"]} == dict(expected_scores)
        assert [row["score"] for row in board["leaderboard"]] == sorted(expected_scores.values(), reverse=True)
        assert "IndexedRangeSearchPlan" in board["plan"]
    finally:
        stop_server(server)
        log.close()

    # Every worker detached: the coordinator goes, and the log brings everything back.
    assert wait_for_coordinator_exit(datadir)
    with open_test_db(datadir) as db:
        db.check()
        with db.snapshot() as snapshot:
            assert sum(len(snapshot.root["carts"][user]) for user in USERS) == len(sent["items"])
            assert sum(record["score"] for record in snapshot.root["scores"].values()) == sum(
                points for _, points in sent["points"]
            )


# -- the pool analytics job and the telemetry pipeline ---------------------------------------


def test_analytics_totals_over_one_snapshot_while_a_writer_commits(datadir):
    done = run_example("analytics", "--orders", "5000", "--processes", "2", "--path", datadir)
    assert "FAIL" not in done.stdout
    assert done.stdout.count("ok  ") == 3
    seq = int(re.search(r"snapshot seq (\d+): (\d+) orders", done.stdout).group(1))
    assert wait_for_coordinator_exit(datadir)
    with open_test_db(datadir) as db:
        db.check()
        with db.snapshot() as snapshot:
            assert snapshot.seq > seq  # the writer kept committing after the pool's snapshot
            orders = sum(len(shard) for shard in snapshot.root["orders"].values())
            assert orders > 5000


def test_telemetry_aggregates_every_event_once_and_cleans_up():
    done = run_example("telemetry", "--producers", "2", "--seconds", "2", "--devices", "20")
    assert "FAIL" not in done.stdout
    assert done.stdout.count("ok  ") == 4
    events = int(re.search(r"(\d+) events from 2 producers", done.stdout).group(1))
    assert events > 0
    assert re.search(rf"consumer: \d+ rounds, {events} events aggregated", done.stdout)
    base = re.search(r"removed the temporary data directory (\S+)", done.stdout).group(1)
    assert not os.path.exists(base)
