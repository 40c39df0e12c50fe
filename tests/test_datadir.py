"""Bad paths and data directories get a clear error and lose nothing."""

from __future__ import annotations

import json
import os
import stat

import pytest

import protobase
from protobase.datadir import FORMAT_VERSION, STAMP, DataDir
from protobase.errors import CoordinatorError, DatabaseClosedError, DataDirectoryError
from tests.conftest import GRACE


def test_new_directory_is_private_and_stamped(datadir):
    with protobase.open(datadir, shutdown_grace=GRACE):
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
    with pytest.raises(DataDirectoryError, match=f"holds format version {FORMAT_VERSION + 1}; this ProtoBase "
                                                 f"reads version {FORMAT_VERSION}"):
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
    with pytest.raises(CoordinatorError, match=f"no coordinator serves {datadir}; run `protobase serve {datadir}`"):
        protobase.open(datadir, start_coordinator=False)


def test_a_path_too_long_for_a_unix_socket_still_works(datadir):
    path = os.path.join(datadir, "x" * 120)
    os.makedirs(datadir, mode=0o700)
    with protobase.open(path, shutdown_grace=GRACE) as db:
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
    with protobase.open(datadir, shutdown_grace=GRACE) as db:  # attaches: the coordinator lingers
        with db.snapshot() as snap:
            assert snap.root["kept"]["value"] == 1
