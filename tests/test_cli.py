"""The `protobase` command line: status, stats, check, dump/load, backup, bench and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import protobase
from protobase.cli import main as cli
from protobase.cli import transfer
from protobase.core.datadir import DataDir
from protobase.persistence.checkpoint import checkpoint_files
from protobase.persistence.wal.faults import FAULTS_ENV
from tests.conftest import GRACE, open_test_db, served, wait_for_coordinator_exit
from tests.test_dumpformat import sample_root, typed

G = ["--grace", str(GRACE)]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


PROGRESS_LINE = re.compile(r"^(dump|load) .+: [\d,]+ .*\(\d+\.\ds\)$")  # output.Progress, shown every 2 s


def assert_one_line_error(err: str, *fragments: str) -> None:
    """`err` is one `protobase: ` line, after any progress lines a slow machine had time to show."""
    lines = [line for line in err.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("protobase: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


def make_closed_database(path: str) -> None:
    with open_test_db(path) as db:
        with db.transaction() as tx:
            tx.root["users"] = {f"u{i}": {"n": i} for i in range(200)}
            tx.root["small"] = [1, 2, 3]
    assert wait_for_coordinator_exit(path)


def is_served(path: str) -> bool:
    return not DataDir(path).wait_until_unserved(timeout=0)


# -- status ------------------------------------------------------------------------------


def test_status_of_a_stopped_database_shows_the_files_and_starts_nothing(datadir, capsys):
    make_closed_database(datadir)
    status, out, _ = run(capsys, "status", datadir)
    assert status == 0
    assert f"no coordinator serves {os.path.abspath(datadir)} (not running)" in out
    assert "checkpoint-" in out and "on disk:" in out
    assert not is_served(datadir) and not os.path.exists(os.path.join(datadir, "coordinator.sock"))


def test_status_of_a_running_database(datadir, capsys):
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["counter"] = 0
        with db.snapshot():
            for _ in range(3):
                with db.transaction() as tx:
                    tx.root["counter"] += 1
            status, out, _ = run(capsys, "status", datadir, "--interval", "0.1")
        reading = db.stats()
    assert status == 0
    assert f"coordinator pid {reading.coordinator_pid}, persistence pid {reading.persistence_pid}" in out
    assert f"seq {reading.seq}," in out and "durable LSN" in out and "lag 0 records" in out
    assert "commit rate:" in out and "commits/s" in out and "reclaimable" in out
    assert f"pid {os.getpid()}" in out and "3 commits old" in out  # our pinned snapshot, not the command's slot
    assert "  readers: 1\n" in out  # the test's handle; the command's own slot is left out
    assert "wal-" in out


def test_status_in_a_real_subprocess(datadir):
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["k"] = 1
        result = subprocess.run(
            [sys.executable, "-m", "protobase", "status", datadir, "--interval", "0.1"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert f"coordinator pid {db.coordinator_pid}" in result.stdout
        assert f"pid {os.getpid()}" in result.stdout  # this process is a reader
    missing = os.path.join(os.path.dirname(datadir), "missing")
    result = subprocess.run(
        [sys.executable, "-m", "protobase", "status", missing], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "does not exist")


# -- stats and check --------------------------------------------------------------------------


def test_stats_is_json(datadir, capsys):
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["k"] = {"v": 1}
        status, out, _ = run(capsys, "stats", datadir)
        assert status == 0
        reading = json.loads(out)
        assert reading["coordinator_pid"] == db.coordinator_pid and reading["seq"] == 1
        assert reading["durable_lsn"] <= reading["last_lsn"]
        assert any(reader["pid"] == os.getpid() for reader in reading["readers"])
        assert {"snapshot_age", "slot"} <= set(reading["readers"][0]) and "hits" in reading["object_cache"]
        assert 0 <= reading["gc_longest_pause_ms"] <= reading["gc_pause_total_ms"] and reading["gc_pauses"] >= 0


def test_stats_never_starts_a_coordinator(datadir, capsys):
    make_closed_database(datadir)
    status, _, err = run(capsys, "stats", datadir)
    assert status == 1
    assert_one_line_error(err, "no coordinator serves")
    assert not is_served(datadir)


def test_check_ok(datadir, capsys):
    make_closed_database(datadir)
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["users"].create_index("n")
    status, out, _ = run(capsys, "check", datadir, *G)
    assert status == 0 and out.startswith("ok: ") and "every invariant holds" in out
    assert wait_for_coordinator_exit(datadir)


def test_check_of_a_damaged_checkpoint_fails_clearly(datadir, capsys):
    make_closed_database(datadir)
    ((_, checkpoint),) = checkpoint_files(datadir)
    size = os.path.getsize(checkpoint)
    with open(checkpoint, "r+b") as file:  # a byte inside the last segment's data
        file.seek(size - 16)
        byte = file.read(1)
        file.seek(size - 16)
        file.write(bytes([byte[0] ^ 0x40]))
    status, out, err = run(capsys, "check", datadir, *G)
    assert status == 1 and not out.startswith("ok")
    assert_one_line_error(err, "corrupt", checkpoint, "checksum")
    assert wait_for_coordinator_exit(datadir)


# -- dump and load -------------------------------------------------------------------------------


def test_dump_then_load_round_trips_every_type(datadir, capsys, monkeypatch):
    monkeypatch.setattr(transfer, "LOAD_BATCH_ITEMS", 50)  # big collections load over several transactions
    original = sample_root()
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            for key, value in original.items():
                tx.root[key] = value
        with db.transaction() as tx:
            tx.root["indexed"].create_index("age")
            tx.root["indexed"].create_index("city")
        with db.snapshot() as snap:
            expected = typed(snap.root)
    assert wait_for_coordinator_exit(datadir)
    dump_file = os.path.join(os.path.dirname(datadir), "dump.jsonl")
    status, _, err = run(capsys, "dump", datadir, "--output", dump_file, *G)
    assert status == 0 and "top-level keys written" in err
    with open(dump_file, encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    assert len(lines) == len(original) and all(set(line) == {"key", "value"} for line in lines)
    assert {"key": "$set", "value": {"$dict": [["$set", [1, 2]]]}} in lines

    fresh = os.path.join(os.path.dirname(datadir), "fresh")
    try:
        status, _, err = run(capsys, "load", fresh, dump_file, *G)
        assert status == 0 and f"{len(original)} lines loaded" in err
        with open_test_db(fresh) as db:
            with db.snapshot() as snap:
                got = typed(snap.root)
                assert got == expected, sorted(repr(item)[:200] for item in expected[2] ^ got[2])
                assert snap.root["indexed"].indexes == ("age", "city")
                assert sorted(snap.root["big dict"].keys())[:2] == ["u0", "u1"]
            db.check()
        again = os.path.join(os.path.dirname(datadir), "again.jsonl")
        assert run(capsys, "dump", fresh, "--output", again, *G)[0] == 0
        with open(dump_file, "rb") as first, open(again, "rb") as second:
            assert first.read() == second.read()  # dumps are reproducible
    finally:
        assert wait_for_coordinator_exit(fresh)
        assert wait_for_coordinator_exit(datadir)


def test_dump_to_stdout(datadir, capsys):
    make_closed_database(datadir)
    status, out, _ = run(capsys, "dump", datadir, *G)
    assert status == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["small", "users"]
    assert wait_for_coordinator_exit(datadir)


@protobase.register_dataclass
@dataclasses.dataclass
class Point:
    x: int


def test_dump_names_a_value_it_cannot_encode(datadir, capsys):
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["shapes"] = {"a": [1, Point(3)]}
        status, _, err = run(capsys, "dump", datadir, *G)
    assert status == 1
    assert_one_line_error(err, "cannot dump root['shapes']['a'][1]", "Point")


def test_load_reports_a_bad_line(datadir, capsys):
    bad = os.path.join(os.path.dirname(datadir), "bad.jsonl")
    with open(bad, "w", encoding="utf-8") as file:
        file.write('{"key": "a", "value": 1}\n{"key": "b", "value": {"$nope": 1}}\n')
    status, _, err = run(capsys, "load", datadir, bad, *G)
    assert status == 1
    assert_one_line_error(err, "line 2", "$nope")


@pytest.mark.parametrize("batch_items", [5_000, 1])  # the bad line in the first batch, or after commits
def test_load_of_a_bad_file_into_a_new_directory_creates_nothing(datadir, capsys, monkeypatch, batch_items):
    monkeypatch.setattr(transfer, "LOAD_BATCH_ITEMS", batch_items)
    parent = os.path.dirname(datadir)
    bad = os.path.join(parent, "bad.jsonl")
    with open(bad, "w", encoding="utf-8") as file:
        file.write('{"key": "a", "value": 1}\n{"key": "b", "value": 2}\nnot json\n')
    before = sorted(os.listdir(parent))
    target = os.path.join(datadir, "deeper", "db")  # its parents are made for it, and removed with it
    status, _, err = run(capsys, "load", target, bad, *G)
    assert status == 1
    assert_one_line_error(err, "line 3 is not a dump line")
    assert sorted(os.listdir(parent)) == before and not os.path.lexists(datadir)


def test_load_into_a_new_directory_appears_only_once_complete(datadir, capsys, monkeypatch):
    monkeypatch.setattr(transfer, "LOAD_BATCH_ITEMS", 1)
    good = os.path.join(os.path.dirname(datadir), "good.jsonl")
    with open(good, "w", encoding="utf-8") as file:
        file.write('{"key": "a", "value": 1}\n{"key": "b", "value": [2]}\n')
    os.makedirs(datadir, mode=0o700)  # an empty directory is a new database's place too
    status, _, err = run(capsys, "load", datadir, good, *G)
    assert status == 0 and f"2 lines loaded into {datadir}" in err
    assert sorted(os.listdir(os.path.dirname(datadir))) == ["db", "good.jsonl"]  # no staging directory left
    assert not is_served(datadir)  # it was moved in after its coordinator stopped
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            assert snap.root["a"] == 1 and list(snap.root["b"]) == [2]


# -- backup, bench, errors ---------------------------------------------------------------------------


def test_backup_then_open_the_backup(datadir, capsys):
    destination = os.path.join(os.path.dirname(datadir), "backup")
    try:
        with open_test_db(datadir) as db:
            with db.transaction() as tx:
                tx.root["users"] = {f"u{i}": i for i in range(100)}
            status, out, err = run(capsys, "backup", datadir, destination, *G)
            with db.transaction() as tx:
                tx.root["after"] = True  # not in the backup
        assert status == 0 and "backing up" in err
        assert f"written to {destination}" in out and f"protobase.open({destination!r})" in out
        with open_test_db(destination) as backup:
            with backup.snapshot() as snap:
                assert dict(snap.root["users"]) == {f"u{i}": i for i in range(100)} and "after" not in snap.root
            backup.check()
        status, _, err = run(capsys, "backup", datadir, destination, *G)  # not empty any more
        assert status == 1
        assert_one_line_error(err, "not an empty directory")
    finally:
        assert wait_for_coordinator_exit(destination)


def test_bench_runs_and_cleans_up(capsys):
    status, out, _ = run(capsys, "bench", "--seconds", "0.2", "--keys", "500")
    assert status == 0
    assert "x a plain dict" in out and "commits, sync" in out and "x sync" in out


@pytest.mark.parametrize("command", ["status", "stats", "check", "dump", "backup"])
def test_bad_directories_are_one_line_errors(datadir, capsys, command):
    parent = os.path.dirname(datadir)
    extra = [os.path.join(parent, "destination")] if command == "backup" else []
    status, _, err = run(capsys, command, os.path.join(parent, "missing"), *extra)
    assert status == 1
    assert_one_line_error(err, "does not exist")
    file_path = os.path.join(parent, "a file")
    with open(file_path, "w") as file:
        file.write("x")
    status, _, err = run(capsys, command, file_path, *extra)
    assert status == 1
    assert_one_line_error(err, "not a directory")
    os.makedirs(datadir, mode=0o700)
    with open(os.path.join(datadir, "PROTOBASE"), "w") as file:
        json.dump({"format": 99}, file)
    status, _, err = run(capsys, command, datadir, *extra)
    assert status == 1
    assert_one_line_error(err, "format version 99")
    assert not os.path.exists(os.path.join(parent, "destination"))


def test_serve_in_the_foreground_with_settings_stops_cleanly_on_sigterm(datadir):
    with served(
        datadir, "--flush-interval", "0.05", "--checkpoint-bytes", "1000000", "--log-level", "WARNING"
    ) as server:
        with protobase.open(datadir, start_coordinator=False, durability="async") as db:
            assert db.coordinator_pid == server.pid
            with db.transaction() as tx:
                tx.root["served"] = {"n": 1}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0  # a final checkpoint, then a clean exit
    assert any(name.startswith("checkpoint-") for name in os.listdir(datadir))
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            assert snap.root["served"] == {"n": 1}


def test_serve_exits_with_failure_after_a_disk_failure(datadir):
    # A supervisor must see the failure: systemd's Restart=on-failure ignores an exit status of 0.
    with served(datadir, "--log-level", "ERROR", env={FAULTS_ENV: "enospc_after=4096"}) as server:
        with protobase.open(datadir, start_coordinator=False) as db:
            with pytest.raises(protobase.CoordinatorError, match="No space left on device"):
                for i in range(10_000):
                    with db.transaction() as tx:
                        tx.root[f"k{i}"] = "x" * 100
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 1
        assert "stopped after a disk failure" in server.stderr.read()
