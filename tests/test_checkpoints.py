"""Checkpoint and backup requests (coordinator/checkpoints.py), against recorders of what they ask.

A checkpoint is asked for once the WAL grew by `checkpoint_bytes`, one at a
time; a backup is a checkpoint into a new, empty directory, answered once
written. A report answers the request whose id it names (in ring order, but
not always: a request sent again to a restarted persistence process comes
back after later ones), and every request in flight pins its seq against
reclamation.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from protobase.coordinator.checkpoints import Checkpoints
from protobase.core.arena import make_pointer
from protobase.core.datadir import STAMP, DataDir
from protobase.errors import CoordinatorError, DataDirectoryError


class Durability:
    def __init__(self) -> None:
        self.wal_bytes = 0
        self.failure: str | None = None
        self.requests: list[dict[str, Any]] = []

    def request_checkpoint(self, **request: Any) -> int:
        self.requests.append(request)
        if request["directory"] is None:
            self.wal_bytes = 0
        return len(self.requests)  # the request's id


class Arena:
    generation_start = 3
    next_index = 5

    def generation(self) -> list[tuple[int, int]]:
        return [(3, 1000), (4, 200)]


class Commits:
    def __init__(self) -> None:
        self.seq = 10
        self.root = make_pointer(4, 8)

    def failure_reply(self) -> list[str]:
        return ["error", "CoordinatorError", "the disk failed. This commit was NOT made durable"]


class Connections:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []

    def answer(self, asker: Any, reply: Any) -> None:
        self.sent.append((asker, reply))


def make(checkpoint_bytes: int = 1000, changed: bool = False) -> tuple[Checkpoints, Durability, Connections]:
    durability, connections = Durability(), Connections()
    checkpoints = Checkpoints(
        durability,
        Arena(),
        Commits(),
        connections,  # type: ignore[arg-type]
        checkpoint_bytes=checkpoint_bytes,
        changed=changed,
    )
    return checkpoints, durability, connections


def commits_of(checkpoints: Checkpoints) -> Commits:
    return checkpoints.commits  # type: ignore[return-value]


def test_a_checkpoint_is_asked_for_once_the_wal_grew_by_checkpoint_bytes_one_at_a_time():
    checkpoints, durability, _ = make()
    durability.wal_bytes = 999
    checkpoints.maybe_checkpoint()
    assert durability.requests == []
    durability.wal_bytes = 1000
    checkpoints.maybe_checkpoint()
    assert durability.requests == [
        {"seq": 10, "root": make_pointer(4, 8), "segments": [(3, 1000), (4, 200)], "next_segment": 5, "directory": None}
    ]
    durability.wal_bytes = 5000
    checkpoints.maybe_checkpoint()
    checkpoints.request()  # the "checkpoint" verb, while one is in flight: nothing more
    assert len(durability.requests) == 1 and checkpoints.checkpoint_in_flight()
    checkpoints.on_checkpointed(1, "/srv/db/checkpoint-1")
    assert checkpoints.checkpoints == 1 and not checkpoints.checkpoint_in_flight()
    checkpoints.maybe_checkpoint()
    assert len(durability.requests) == 2


def test_a_checkpoint_clears_the_change_a_commit_noted_and_a_backup_does_not():
    checkpoints, _, _ = make(changed=True)
    checkpoints.request(asker="backup", directory="/backups/new")
    assert checkpoints.changed_since_checkpoint
    checkpoints.request()
    assert not checkpoints.changed_since_checkpoint
    checkpoints.note_commit()
    assert checkpoints.changed_since_checkpoint


def test_a_report_answers_the_request_it_names_and_requests_in_flight_pin_their_seq(tmp_path):
    checkpoints, durability, connections = make()
    checkpoints.request(asker="first backup", directory=str(tmp_path / "a"))
    checkpoints.request()
    commits_of(checkpoints).seq = 11
    checkpoints.request(asker="second backup", directory=str(tmp_path / "b"))  # beside a checkpoint: allowed
    assert [request["directory"] for request in durability.requests] == [str(tmp_path / "a"), None, str(tmp_path / "b")]
    assert checkpoints.pinned_seqs() == [10, 10, 11]
    # The first backup was sent again to a restarted persistence process: it comes back last.
    checkpoints.on_checkpointed(2, "checkpoint")
    assert checkpoints.pinned_seqs() == [10, 11] and not checkpoints.checkpoint_in_flight()
    checkpoints.on_checkpointed(3, "b/checkpoint")
    checkpoints.on_checkpointed(1, "a/checkpoint")
    checkpoints.on_checkpointed(1, "a/checkpoint")  # written twice (by a child killed before it left the ring): ignored
    checkpoints.on_checkpointed(9, "a report of nothing in flight")  # ignored
    assert connections.sent == [
        ("second backup", ["ok", 11, "b/checkpoint"]),
        ("first backup", ["ok", 10, "a/checkpoint"]),
    ]
    assert checkpoints.checkpoints == 1 and checkpoints.pinned_seqs() == []


def test_a_backup_goes_only_into_an_empty_directory_and_not_after_a_disk_failure(tmp_path):
    checkpoints, durability, _ = make()
    full = tmp_path / "full"
    DataDir.open(full)  # a data directory (stamped) that holds something
    (full / "wal-0000000000000001.log").write_text("x")
    with pytest.raises(DataDirectoryError, match=f"^backup destination {full} is not empty; pass a new directory$"):
        checkpoints.backup("asker", str(full))
    durability.failure = "the disk failed"
    with pytest.raises(CoordinatorError, match="^the disk failed. This commit was NOT made durable$"):
        checkpoints.backup("asker", str(tmp_path / "new"))
    assert durability.requests == [] and not checkpoints.requests
    durability.failure = None
    checkpoints.backup("asker", str(tmp_path / "new"))
    assert durability.requests[0]["directory"] == str(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == [STAMP]  # opened as a data directory: stamped, nothing else


def test_a_root_outside_the_generation_a_checkpoint_copies_is_a_bug_caught_before_asking():
    checkpoints, durability, _ = make()
    commits_of(checkpoints).root = make_pointer(2, 8)  # in a segment older than the generation's first
    with pytest.raises(AssertionError, match="lies outside the generation"):
        checkpoints.request()
    assert durability.requests == [] and not checkpoints.requests
