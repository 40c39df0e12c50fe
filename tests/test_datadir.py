"""Bad paths and data directories get a clear error and lose nothing."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest

import protobase
from protobase.core.datadir import FORMAT_VERSION, STAMP, DataDir
from protobase.errors import CoordinatorError, DatabaseClosedError, DataDirectoryError
from tests.conftest import SPAWN, open_test_db


def test_new_directory_is_private_and_stamped(datadir):
    with open_test_db(datadir):
        assert stat.S_IMODE(os.stat(datadir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(datadir, "coordinator.sock")).st_mode) == 0o600
        with open(os.path.join(datadir, STAMP)) as file:
            assert json.load(file) == {"format": FORMAT_VERSION}


def test_a_file_is_not_a_data_directory(datadir):
    os.makedirs(os.path.dirname(datadir), exist_ok=True)
    with open(datadir, "w") as file:
        file.write("precious")
    with pytest.raises(DataDirectoryError, match="exists and is not a directory; pass a directory path"):
        protobase.open(datadir)
    with open(datadir) as file:
        assert file.read() == "precious"


def test_loose_permissions_are_refused_with_the_fix(datadir):
    os.makedirs(datadir, mode=0o700)
    os.chmod(datadir, 0o755)
    with pytest.raises(DataDirectoryError, match=f"has mode 755, open to other users; run `chmod 700 {datadir}`"):
        protobase.open(datadir)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_a_directory_of_another_user_is_refused(datadir):
    os.makedirs(datadir, mode=0o700)
    os.chown(datadir, 65534, 65534)
    with pytest.raises(DataDirectoryError, match="belongs to uid 65534, not to you"):
        protobase.open(datadir)


def test_another_format_version_is_refused_untouched(datadir):
    os.makedirs(datadir, mode=0o700)
    stamp = os.path.join(datadir, STAMP)
    with open(stamp, "w") as file:
        json.dump({"format": FORMAT_VERSION + 1}, file)
    with open(os.path.join(datadir, "data.bin"), "wb") as file:
        file.write(b"\x01\x02")
    with pytest.raises(
        DataDirectoryError,
        match=f"holds format version {FORMAT_VERSION + 1}; this ProtoBase reads version {FORMAT_VERSION}",
    ):
        protobase.open(datadir)
    assert sorted(os.listdir(datadir)) == [STAMP, "data.bin"]


def test_a_foreign_non_empty_directory_is_refused(datadir):
    os.makedirs(datadir, mode=0o700)
    with open(os.path.join(datadir, "notes.txt"), "w") as file:
        file.write("mine")
    with pytest.raises(DataDirectoryError, match="is not empty and has no PROTOBASE stamp"):
        protobase.open(datadir)
    assert os.listdir(datadir) == ["notes.txt"]


def test_a_damaged_stamp_is_reported(datadir):
    os.makedirs(datadir, mode=0o700)
    with open(os.path.join(datadir, STAMP), "w") as file:
        file.write("{not json")
    with pytest.raises(DataDirectoryError, match="it is damaged"):
        protobase.open(datadir)


def test_missing_directory_without_create(datadir):
    with pytest.raises(DataDirectoryError, match="does not exist"):
        protobase.open(datadir, create=False)


def test_no_coordinator_and_not_allowed_to_start_one(datadir):
    with open_test_db(datadir):
        pass
    assert DataDir(datadir).wait_until_unserved()
    with pytest.raises(CoordinatorError, match=f"no coordinator serves {datadir}; run `protobase serve {datadir}`"):
        protobase.open(datadir, start_coordinator=False)


def test_an_open_that_may_not_start_a_coordinator_creates_nothing(datadir):
    # It created (and stamped) the directory, then failed: no coordinator can serve a
    # directory it would have to create.
    message = f"data directory {datadir} does not exist; check the path"
    with pytest.raises(DataDirectoryError, match=message):
        protobase.open(datadir, start_coordinator=False)
    assert not os.path.lexists(datadir)
    os.makedirs(datadir, mode=0o700)
    with pytest.raises(
        DataDirectoryError,
        match=f"{datadir} is not a ProtoBase data directory \\(it has no PROTOBASE stamp\\); check the path",
    ):
        protobase.open(datadir, start_coordinator=False)
    assert os.listdir(datadir) == []


def test_an_empty_path_is_refused_not_taken_for_the_current_directory(datadir, monkeypatch):
    os.makedirs(datadir, mode=0o700)
    monkeypatch.chdir(datadir)
    with pytest.raises(
        DataDirectoryError,
        match=r"the data directory path is empty; pass the directory's path "
        r"\(for the current directory, pass '\.'\)",
    ):
        open_test_db("")
    assert os.listdir(datadir) == []


# -- directories we cannot write ------------------------------------------------------------------

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
PR_CAPBSET_DROP = 24
_CAPABILITY_VERSION_3 = 0x20080522


def _without_permission_override() -> None:
    """Make this process (and what it execs) subject to file permissions, as a non-root user is.

    Root ignores a directory's mode (CAP_DAC_OVERRIDE): drop that capability
    and CAP_DAC_READ_SEARCH from the bounding set (so an exec'd coordinator
    does not regain them) and from this process's own sets.
    """
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    dropped = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    header, data = Header(_CAPABILITY_VERSION_3, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & ~dropped)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _open_unprivileged(path: str, replies) -> None:
    """In a child: open `path` subject to file permissions; send back the error's (type, message)."""
    if os.geteuid() == 0:
        _without_permission_override()
    try:
        with open_test_db(path):
            replies.send(("opened", ""))
    except Exception as error:
        replies.send((type(error).__name__, str(error)))


@pytest.mark.parametrize("holds", ["nothing", "a database"])
def test_a_read_only_directory_is_refused_with_what_to_do(datadir, spawn_process, holds):
    # An empty one raised a bare PermissionError while writing the stamp; one holding a
    # database got as far as starting a coordinator, which failed on its first file.
    if holds == "a database":
        with open_test_db(datadir) as db:
            with db.transaction() as tx:
                tx.root["kept"] = 1
        assert DataDir(datadir).wait_until_unserved()
    else:
        os.makedirs(datadir, mode=0o700)
    before = sorted(os.listdir(datadir))
    os.chmod(datadir, 0o500)
    try:
        replies, child_end = SPAWN.Pipe(duplex=False)
        with replies, child_end:
            child = spawn_process(_open_unprivileged, datadir, child_end)
            assert replies.poll(60), "the child did not answer"
            reply = replies.recv()
        child.join(60)
    finally:
        os.chmod(datadir, 0o700)
    assert reply == (
        "DataDirectoryError",
        f"cannot write in data directory {datadir} (Permission denied): ProtoBase writes its lock "
        f"files, socket and write-ahead log in the data directory, even to read it; make {datadir} "
        f"writable for you (`chmod u+w {datadir}`), or open a copy in a writable place",
    )
    assert sorted(os.listdir(datadir)) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only filesystem needs root")
def test_a_read_only_filesystem_is_refused_with_what_to_do(datadir):
    import subprocess

    os.makedirs(datadir, mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,mode=0700,size=64k", "tmpfs", datadir], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(
            DataDirectoryError,
            match=f"cannot write in data directory {datadir} \\(Read-only file "
            f"system\\): .*{datadir} is on a read-only filesystem: remount "
            f"it read-write, or copy the database",
        ):
            open_test_db(datadir)
        with pytest.raises(
            DataDirectoryError, match=f"cannot create data directory {datadir}/db \\(Read-only file system\\)"
        ):
            open_test_db(os.path.join(datadir, "db"))
    finally:
        subprocess.run(["umount", datadir], check=True)


def test_a_path_too_long_for_a_unix_socket_still_works(datadir):
    path = os.path.join(datadir, "x" * 120)
    os.makedirs(datadir, mode=0o700)
    with open_test_db(path) as db:
        with db.transaction() as tx:
            tx.root["deep"] = True
        with db.snapshot() as snap:
            assert snap.root["deep"] is True
    assert DataDir(path).wait_until_unserved()


def test_a_closed_database_says_so(db):
    db.close()
    with pytest.raises(DatabaseClosedError, match=f"database {db.path} is closed; open it again"):
        db.snapshot()
    with pytest.raises(DatabaseClosedError):
        db.transaction()
    db.close()  # idempotent
    assert "closed" in repr(db)


def test_reopening_after_close_sees_the_data(datadir):
    with protobase.open(datadir, shutdown_grace=5.0) as db:
        with db.transaction() as tx:
            tx.root["kept"] = {"value": 1}
        lingering = db.coordinator_pid
    with open_test_db(datadir) as db:
        assert db.coordinator_pid == lingering  # attached: the coordinator lingered
        with db.snapshot() as snap:
            assert snap.root["kept"]["value"] == 1
    os.kill(lingering, signal.SIGTERM)  # rather than wait out its grace
