"""The test harness: it judges only what the test session created, and opens databases one way.

Regression (issue 10, item 21): the session check used to count every
/dev/shm entry new since the session started, whose coordinator was dead, as
its own leak, and swept it: on a shared host it failed for other databases'
orphans and removed them.
"""

from __future__ import annotations

import os
import tempfile

from protobase.core.datadir import DataDir
from protobase.shm import names
from protobase.shm.control import ControlBlock
from tests.conftest import GRACE, open_test_db, processes_serving, remove_test_directory, wait_for_coordinator_exit


def orphan_instance() -> str:
    """A fresh instance whose control segment names a coordinator that is not alive."""
    instance = names.new_instance_id()
    # Our own pid with another start time: a process that is not (any more) alive.
    block = ControlBlock.create(names.control_name(instance), coordinator_pid=os.getpid(), coordinator_start=1.0)
    block.close()
    return instance


def test_another_databases_orphans_are_neither_counted_nor_removed(session_dir):
    foreign = orphan_instance()
    try:
        root = tempfile.mkdtemp(prefix="judge", dir=session_dir)
        assert remove_test_directory(root) == []
        assert names.instance_entries(foreign) == [names.control_name(foreign)]
    finally:
        names.sweep(foreign)


def test_orphans_of_an_instance_created_in_the_directory_are_reported_and_swept(session_dir):
    root = tempfile.mkdtemp(prefix="judge", dir=session_dir)
    ours = orphan_instance()
    DataDir.open(os.path.join(root, "db")).write_instance(ours)  # as a crashed coordinator leaves it
    problems = remove_test_directory(root)
    assert problems == [f"/dev/shm entries leaked: {[names.control_name(ours)]}"]
    assert names.instance_entries(ours) == []
    assert not os.path.exists(root)


def coordinator_grace(path: str) -> str:
    """The --grace argument on the command line of the coordinator serving `path`."""
    (coordinator,) = [process for process in processes_serving(path) if "protobase.coordinator" in process.cmdline()]
    command = coordinator.cmdline()
    return command[command.index("--grace") + 1]


def test_open_test_db_starts_a_coordinator_with_the_tests_short_grace(datadir):
    with open_test_db(datadir) as db:
        assert coordinator_grace(db.path) == str(GRACE)
    assert wait_for_coordinator_exit(datadir)


def test_open_test_db_passes_options_through_and_a_grace_given_wins(datadir):
    with open_test_db(datadir, shutdown_grace=0.2, durability="async") as db:
        assert coordinator_grace(db.path) == "0.2"
        assert db.durability == "async"
    assert wait_for_coordinator_exit(datadir)
