"""Tests of protobase/persistence/wal/: the WAL byte format, torn tails, damage, salvage, faults.

Pure file tests in tmp_path: no database, no coordinator. Faults are injected
through the module's real write and sync paths (`inject_faults`, and the
PROTOBASE_WAL_FAULTS variable in a separate process), never with mocks.
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
import struct
import subprocess
import sys
import zlib

import pytest

from protobase.errors import CorruptionError, DatabaseClosedError, ProtoBaseError, WalSyncError, WalWriteError
from protobase.persistence.wal import faults
from protobase.persistence.wal import writer as writer_module
from protobase.persistence.wal.faults import FAULTS_ENV, inject_faults
from protobase.persistence.wal.files import list_wal_files, remove_wal_files_before, wal_file_name
from protobase.persistence.wal.format import FILE_HEADER_SIZE, RECORD_HEADER_SIZE
from protobase.persistence.wal.reader import read_directory, read_records, scan
from protobase.persistence.wal.salvage import salvage_records
from protobase.persistence.wal.search import lsn_range_regex
from protobase.persistence.wal.writer import PREALLOCATE_BYTES, WalWriter


@pytest.fixture(autouse=True)
def no_faults_left(monkeypatch):
    """Every test starts and ends with no injected fault."""
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    saved = (faults.active.write_budget, faults.active.sync_budget, faults.active.env_applied)
    inject_faults()
    yield
    faults.active.write_budget, faults.active.sync_budget, faults.active.env_applied = saved


def payload_for(lsn: int, size: int | None = None) -> bytes:
    """A payload that says which record it is, of varied length."""
    size = (lsn * 7) % 23 if size is None else size
    return f"<{lsn}>".encode() + bytes((lsn + i) % 251 for i in range(size))


def write_wal(directory, first_lsn: int, count: int, size: int | None = None) -> tuple[str, list[bytes], list[int]]:
    """A synced WAL file of `count` records; returns its path, the payloads and record offsets."""
    payloads = [payload_for(lsn, size) for lsn in range(first_lsn, first_lsn + count)]
    directory.mkdir(exist_ok=True)
    with WalWriter.create(str(directory), first_lsn) as writer:
        offsets = []
        for payload in payloads:
            offsets.append(writer.size)
            writer.append(payload)
        writer.sync()
        return writer.path, payloads, offsets


def copy_with(path: str, data: bytes, directory) -> str:
    """Write `data` under the same file name in another directory; return the new path."""
    directory.mkdir(exist_ok=True)
    target = os.path.join(str(directory), os.path.basename(path))
    with open(target, "wb") as file:
        file.write(data)
    return target


def read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


# --- the byte format -----------------------------------------------------


def test_bytes_on_disk_match_the_documented_format(tmp_path):
    path, payloads, offsets = write_wal(tmp_path, 42, 3)
    assert os.path.basename(path) == "wal-000000000000002a.log"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = read(path)
    magic, version, reserved, salt, first_lsn = struct.unpack_from("<8sIIQQ", data)
    assert (magic, version, reserved, first_lsn) == (b"PBWAL001", 1, 0, 42)
    offset, prev = 32, salt
    for index, payload in enumerate(payloads):
        assert offset == offsets[index]
        crc, length, lsn, record_prev = struct.unpack_from("<IIQQ", data, offset)
        assert (length, lsn, record_prev) == (len(payload), 42 + index, prev)
        assert crc == zlib.crc32(struct.pack("<Q", salt) + data[offset + 4 : offset + 24] + payload)
        assert data[offset + 24 : offset + 24 + length] == payload
        prev, offset = offset, offset + 24 + length
    assert offset == len(data)


def test_salts_differ_between_files(tmp_path):
    first, _, _ = write_wal(tmp_path, 1, 1)
    second, _, _ = write_wal(tmp_path, 2, 1)
    assert scan(first).salt != scan(second).salt


# --- round trip ----------------------------------------------------------


def test_round_trip_across_two_files(tmp_path):
    written = {}
    writer = WalWriter.create(str(tmp_path), 1)
    for lsn in range(1, 41):
        written[lsn] = payload_for(lsn)
        assert writer.append(written[lsn]) == lsn
    batch = [b"", b"x" * 100_000, payload_for(43)]
    assert writer.append_many(batch) == 43
    written.update(zip(range(41, 44), batch))
    assert writer.append_many([]) == 43
    writer.sync()
    assert (writer.last_lsn, writer.next_lsn, writer.synced_lsn) == (43, 44, 43)
    # While open, the file runs on in preallocated zeros, which read as a torn tail ...
    assert os.path.getsize(writer.path) == PREALLOCATE_BYTES > writer.size
    open_scan = scan(writer.path)
    assert (open_scan.good_end, open_scan.torn, open_scan.corrupt, open_scan.last_lsn) == (writer.size, True, False, 43)
    writer.close()
    assert os.path.getsize(writer.path) == writer.size  # ... and closing cuts them

    rotated = WalWriter.create(str(tmp_path), writer.next_lsn)  # rotation: a new file at next_lsn
    for lsn in range(44, 61):
        written[lsn] = payload_for(lsn, size=lsn * 3)
    assert rotated.append_many([written[lsn] for lsn in range(44, 61)]) == 60
    rotated.sync()
    rotated.close()

    files = list_wal_files(str(tmp_path))
    assert [first for first, _ in files] == [1, 44]
    assert list(read_records(files[0][1])) == [(lsn, written[lsn]) for lsn in range(1, 44)]
    assert list(read_records(files[1][1])) == [(lsn, written[lsn]) for lsn in range(44, 61)]
    assert list(read_records(files[0][1], after_lsn=40)) == [(lsn, written[lsn]) for lsn in (41, 42, 43)]
    assert list(read_records(files[1][1], after_lsn=60)) == []
    for after in (0, 1, 42, 43, 44, 59, 60):
        assert list(read_directory(str(tmp_path), after)) == [(lsn, written[lsn]) for lsn in range(after + 1, 61)]
    result = scan(files[0][1])
    assert not result.torn and not result.corrupt and result.last_lsn == 43
    assert [(record.lsn, record.payload) for record in result.records] == [(n, written[n]) for n in range(1, 44)]


def test_preallocated_zeros_after_a_crash_are_cut_and_never_taken_for_damage(tmp_path):
    writer = WalWriter.create(str(tmp_path), 1)
    big = b"b" * (PREALLOCATE_BYTES * 2 + 10)  # a record past one step grows the file by whole steps
    writer.append_many([b"one", big])
    writer.sync()
    assert os.path.getsize(writer.path) == 3 * PREALLOCATE_BYTES
    os.close(writer._fd)  # the process dies: no close, the zeros stay
    writer._fd = None

    records, skipped = salvage_records(writer.path)
    assert [(r.lsn, r.payload) for r in records] == [(1, b"one"), (2, big)] and skipped == []
    with WalWriter.open_for_append(writer.path) as reopened:
        assert os.path.getsize(writer.path) == reopened.size == writer.size
        assert reopened.append(b"three") == 3
    assert [lsn for lsn, _ in read_records(writer.path)] == [1, 2, 3]


def test_without_preallocation_the_write_extends_the_file(tmp_path, monkeypatch):
    def refuse(fd, offset, length):
        raise OSError(errno.ENOSPC, "no room to preallocate")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    with WalWriter.create(str(tmp_path), 1) as writer:
        writer.append_many([b"one", b"two"])
        assert os.path.getsize(writer.path) == writer.size
    assert list(read_records(writer.path)) == [(1, b"one"), (2, b"two")]


def test_reopened_writer_continues_the_chain(tmp_path):
    path, payloads, _ = write_wal(tmp_path, 5, 3)
    with WalWriter.open_for_append(path) as writer:
        assert (writer.first_lsn, writer.next_lsn, writer.size) == (5, 8, os.path.getsize(path))
        assert writer.append(b"more") == 8
    assert list(read_records(path)) == [(5, payloads[0]), (6, payloads[1]), (7, payloads[2]), (8, b"more")]


def test_empty_file_reopens(tmp_path):
    with WalWriter.create(str(tmp_path), 7) as writer:
        path = writer.path
    result = scan(path)
    assert (result.records, result.last_lsn, result.torn) == ([], 6, False)
    with WalWriter.open_for_append(path) as writer:
        assert writer.append(b"a") == 7


# --- torn tails ----------------------------------------------------------


def test_truncation_at_every_offset_of_the_last_two_records(tmp_path):
    path, payloads, offsets = write_wal(tmp_path / "src", 10, 5)
    original = read(path)
    ends = offsets[1:] + [len(original)]
    for cut in range(offsets[-2], len(original) + 1):
        kept = sum(1 for end in ends if end <= cut)
        good_end = offsets[kept] if kept < len(offsets) else len(original)
        copy = copy_with(path, original[:cut], tmp_path / "cut")
        result = scan(copy)
        assert [(r.lsn, r.payload) for r in result.records] == list(zip(range(10, 10 + kept), payloads)), cut
        assert (result.good_end, result.torn, result.corrupt_offset) == (good_end, cut != good_end, None), cut
        with WalWriter.open_for_append(copy) as writer:
            assert os.path.getsize(copy) == good_end
            assert writer.append(b"after the cut") == 10 + kept
        result = scan(copy)
        assert not result.torn and [r.lsn for r in result.records] == list(range(10, 11 + kept))
        assert result.records[-1].payload == b"after the cut"


def test_file_shorter_than_its_header_is_an_empty_torn_file(tmp_path):
    path, _, _ = write_wal(tmp_path / "src", 3, 1)
    for cut in (0, 1, 31):
        copy = copy_with(path, read(path)[:cut], tmp_path / "cut")
        result = scan(copy)
        assert (result.records, result.header_torn, result.torn, result.last_lsn) == ([], True, cut > 0, None)
        assert list(read_records(copy)) == []
        with WalWriter.open_for_append(copy) as writer:  # gets a fresh header, first_lsn from its name
            assert writer.append(b"x") == 3
        assert list(read_records(copy)) == [(3, b"x")]


def test_zero_filled_tail_is_torn(tmp_path):
    path, payloads, _ = write_wal(tmp_path, 1, 3)
    with open(path, "ab") as file:
        file.write(bytes(256 * 1024))  # a crash after the file grew but before its blocks were written
    result = scan(path)
    assert result.torn and not result.corrupt and len(result.records) == 3


# --- damage --------------------------------------------------------------


def test_every_single_bit_flip_is_detected(tmp_path):
    path, payloads, offsets = write_wal(tmp_path / "src", 1, 3, size=6)
    original = read(path)
    expected = list(zip(range(1, 4), payloads))
    for bit in range(len(original) * 8):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        copy = copy_with(path, bytes(data), tmp_path / "flip")
        byte = bit // 8
        if byte < FILE_HEADER_SIZE:
            with pytest.raises(CorruptionError, match="protobase recover|ProtoBase release"):
                scan(copy)
            continue
        damaged = sum(1 for offset in offsets if offset <= byte) - 1  # index of the record hit
        result = scan(copy)
        assert [(r.lsn, r.payload) for r in result.records] == expected[:damaged], bit
        if damaged < 2:  # valid records follow the damaged one: reported, not cut
            assert (result.corrupt_offset, result.torn) == (offsets[damaged], False), bit
            with pytest.raises(CorruptionError):
                list(read_records(copy))
        else:
            assert (result.corrupt_offset, result.torn) == (None, True), bit


def test_salvage_keeps_every_record_of_a_file_whose_header_has_a_bit_flip(tmp_path):
    # The records prove the salt (the first one names it, and each validates under it) and
    # their LSNs: a damaged header field (magic, version, reserved, salt, first lsn) costs
    # nothing but the header. Salvage used to give up on the whole file.
    path, payloads, _ = write_wal(tmp_path / "src", 1, 100)
    original = read(path)
    for bit in range(FILE_HEADER_SIZE * 8):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        copy = copy_with(path, bytes(data), tmp_path / "flip")
        records, skipped = salvage_records(copy)
        assert [(record.lsn, record.payload) for record in records] == list(zip(range(1, 101), payloads)), bit
        assert skipped == [(0, FILE_HEADER_SIZE)], bit


def test_salvage_of_a_file_whose_header_and_first_record_are_damaged(tmp_path):
    path, payloads, offsets = write_wal(tmp_path / "src", 1, 5, size=40)
    data = bytearray(read(path))
    data[0] ^= 1  # the magic: the salt field is still right, and proves itself on record 2
    data[offsets[0] + 30] ^= 1
    copy = copy_with(path, bytes(data), tmp_path / "magic")
    records, skipped = salvage_records(copy)
    assert [record.lsn for record in records] == [2, 3, 4, 5]
    assert skipped == [(0, FILE_HEADER_SIZE), (offsets[0], offsets[1])]
    data[16] ^= 1  # the salt too: the first record still names it in its prev field
    copy = copy_with(path, bytes(data), tmp_path / "salt")
    assert salvage_records(copy) == (records, skipped)
    data[offsets[0] + 16] ^= 1  # and that field: nothing left proves the salt
    copy = copy_with(path, bytes(data), tmp_path / "prev")
    assert salvage_records(copy) == ([], [(0, len(data))])


@pytest.mark.parametrize("damage", ["payload", "length", "zeros", "garbage"])
def test_bad_record_followed_by_good_ones_is_reported(tmp_path, damage):
    path, payloads, offsets = write_wal(tmp_path, 1, 5, size=40)
    data = bytearray(read(path))
    bad = offsets[2]
    if damage == "payload":
        data[bad + 30] ^= 0xFF
    elif damage == "length":
        struct.pack_into("<I", data, bad + 4, 3)
    elif damage == "zeros":
        data[bad : offsets[3] + 10] = bytes(offsets[3] + 10 - bad)  # kills record 3 and the start of record 4
    else:
        data[bad : bad + 24] = os.urandom(24)
    with open(path, "wb") as file:
        file.write(data)

    result = scan(path)
    assert (result.corrupt_offset, result.torn, len(result.records)) == (bad, False, 2)
    assert result.resume_lsn in (4, 5)
    message = f"WAL file {path} is corrupt at offset {bad}: "
    with pytest.raises(CorruptionError) as caught:
        list(read_records(path))
    assert str(caught.value).startswith(message)
    assert "run `protobase recover`" in str(caught.value)
    with pytest.raises(CorruptionError, match="is corrupt at offset"):
        list(read_directory(str(tmp_path)))
    with pytest.raises(CorruptionError, match="is corrupt at offset"):
        WalWriter.open_for_append(path)
    assert list(read_records(path, strict=False)) == [(1, payloads[0]), (2, payloads[1])]
    assert read(path) == bytes(data)  # nothing was cut


def test_record_spliced_from_another_file_is_rejected(tmp_path):
    mine, payloads, offsets = write_wal(tmp_path / "a", 1, 4)
    other, other_payloads, other_offsets = write_wal(tmp_path / "b", 1, 5)
    assert offsets == other_offsets[:4]  # same lsns, payloads and places: only the salt differs
    ours, theirs = read(mine), read(other)

    # one of its records in the middle of ours: damage, reported
    spliced = ours[: offsets[1]] + theirs[offsets[1] : offsets[2]] + ours[offsets[2] :]
    path = copy_with(mine, spliced, tmp_path / "middle")
    result = scan(path)
    assert (len(result.records), result.corrupt_offset) == (1, offsets[1])

    # its next record appended after ours: never read, cut when reopened
    path = copy_with(mine, ours + theirs[other_offsets[4] :], tmp_path / "tail")
    result = scan(path)
    assert (len(result.records), result.torn, result.corrupt_offset) == (4, True, None)
    with WalWriter.open_for_append(path) as writer:
        assert writer.next_lsn == 5
    assert read(path) == ours


def test_stale_record_of_the_same_lsn_is_not_taken_for_a_follower(tmp_path):
    path, payloads, offsets = write_wal(tmp_path, 1, 3)
    data = read(path)
    # a torn tail that happens to hold a copy of an earlier, valid record
    with open(path, "ab") as file:
        file.write(b"\x00" * 5 + data[offsets[1] : offsets[2]])
    result = scan(path)
    assert (len(result.records), result.torn, result.corrupt_offset) == (3, True, None)


# --- file header ---------------------------------------------------------


def test_bad_magic_is_refused_with_advice(tmp_path):
    path, _, _ = write_wal(tmp_path, 1, 2)
    data = bytearray(read(path))
    data[:8] = b"NOTAWAL!"
    with open(path, "wb") as file:
        file.write(data)
    expected = (
        f"{path} is not a ProtoBase WAL file (magic b'NOTAWAL!', expected b'PBWAL001'); move it out of the data "
        f"directory if it does not belong there, otherwise run `protobase recover` on the data directory to "
        f"inspect and salvage it"
    )
    for action in (lambda: scan(path), lambda: list(read_records(path)), lambda: WalWriter.open_for_append(path)):
        with pytest.raises(CorruptionError) as caught:
            action()
        assert str(caught.value) == expected


def test_other_format_version_is_refused_with_advice(tmp_path):
    path, _, _ = write_wal(tmp_path, 1, 2)
    data = bytearray(read(path))
    struct.pack_into("<I", data, 8, 2)
    with open(path, "wb") as file:
        file.write(data)
    with pytest.raises(CorruptionError) as caught:
        scan(path)
    assert str(caught.value) == (
        f"{path} is WAL format version 2, this ProtoBase reads version 1; "
        f"open the database with the ProtoBase release that wrote it"
    )


def test_damaged_salt_is_not_mistaken_for_a_torn_file(tmp_path):
    path, _, _ = write_wal(tmp_path / "src", 1, 2)
    data = bytearray(read(path))
    data[20] ^= 0x10  # in the salt: every crc fails, but the first record names the true salt
    copy = copy_with(path, bytes(data), tmp_path / "other-name")
    os.rename(copy, copy + ".saved")  # a name that does not encode the lsn: only the records can tell
    with pytest.raises(CorruptionError, match="damaged file header: salt .* first record was written under salt"):
        scan(copy + ".saved")


def test_first_lsn_must_match_the_file_name(tmp_path):
    path, _, _ = write_wal(tmp_path, 1, 2)
    os.rename(path, os.path.join(str(tmp_path), wal_file_name(2)))
    with pytest.raises(CorruptionError, match="first lsn 1 but its name says 2"):
        scan(os.path.join(str(tmp_path), wal_file_name(2)))


# --- faults --------------------------------------------------------------


def test_enospc_mid_record_cuts_back_to_the_last_good_record(tmp_path):
    writer = WalWriter.create(str(tmp_path), 1)
    writer.append_many([b"one", b"two"])
    writer.sync()
    good_size = writer.size
    with inject_faults(write_fail_after_bytes=30):  # header and 6 payload bytes, then a short write, then ENOSPC
        with pytest.raises(WalWriteError) as caught:
            writer.append(b"three" * 20)
        assert faults.active.write_budget == 0  # the partial chunk really was written
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (
        f"cannot write 1 record(s) from lsn 3 to WAL file {writer.path} (No space left on device (injected)); "
        f"the file was cut back to lsn 2; free disk space and retry"
    )
    assert isinstance(caught.value, ProtoBaseError)
    assert os.path.getsize(writer.path) == good_size == writer.size
    result = scan(writer.path)
    assert [(r.lsn, r.payload) for r in result.records] == [(1, b"one"), (2, b"two")] and not result.torn

    with inject_faults(write_fail_after_bytes=100):  # a batch fails in its second record: none of it stays
        with pytest.raises(WalWriteError, match="cannot write 3 record"):
            writer.append_many([b"a" * 40, b"b" * 40, b"c" * 40])
    assert os.path.getsize(writer.path) == good_size

    assert writer.append(b"three") == 3  # space came back: the writer carries on
    writer.sync()
    writer.close()
    assert list(read_records(writer.path)) == [(1, b"one"), (2, b"two"), (3, b"three")]


def test_a_payload_given_as_parts_is_written_as_the_whole_would_be(tmp_path):
    # A large ring record comes as its fragments; the writer takes them as they are, never joined:
    # the same records, of the same sizes, as the joined payload (each file has a salt of its own).
    large = os.urandom(writer_module.WRITE_AS_IS + 10)
    parts = [large[:7], large[7 : writer_module.WRITE_AS_IS + 8], b"", large[writer_module.WRITE_AS_IS + 8 :]]
    written = []
    for name, batch in (("whole", [b"one", large, b"two"]), ("parts", [b"one", parts, b"two"])):
        (tmp_path / name).mkdir()
        with WalWriter.create(str(tmp_path / name), 1) as writer:
            assert writer.append_many(batch) == 3
            writer.sync()
            size = writer.size
        written.append((size, list(read_records(os.path.join(tmp_path, name, wal_file_name(1))))))
    assert written[0] == written[1] and written[1][1] == [(1, b"one"), (2, large), (3, b"two")]


def test_a_write_failing_inside_a_large_part_cuts_the_batch_back(tmp_path):
    writer = WalWriter.create(str(tmp_path), 1)
    writer.append(b"one")
    writer.sync()
    good_size = writer.size
    large = os.urandom(writer_module.WRITE_AS_IS + 100)  # large[5:] is written as it is
    with inject_faults(write_fail_after_bytes=writer_module.WRITE_AS_IS // 2):  # inside that write
        with pytest.raises(WalWriteError, match="cannot write 2 record"):
            writer.append_many([b"two", [large[:5], large[5:]]])
    assert os.path.getsize(writer.path) == good_size == writer.size
    assert writer.append_many([[large[:5], large[5:]]]) == 2
    writer.sync()
    writer.close()
    assert list(read_records(writer.path)) == [(1, b"one"), (2, large)]


def test_enospc_while_creating_leaves_no_file(tmp_path):
    with inject_faults(write_fail_after_bytes=10):
        with pytest.raises(WalWriteError, match="cannot create WAL file") as caught:
            WalWriter.create(str(tmp_path), 1)
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_fsync_error_fails_the_writer_for_good(tmp_path):
    writer = WalWriter.create(str(tmp_path), 1)
    writer.append(b"one")
    writer.sync()
    writer.append(b"two")
    with inject_faults(sync_error=True):
        with pytest.raises(WalSyncError) as caught:
            writer.sync()
    assert caught.value.errno == errno.EIO
    assert str(caught.value) == (
        f"fsync of WAL file {writer.path} failed (Input/output error (injected)): records after lsn 1 may not be "
        f"on disk; this writer is unusable, restart the database so it recovers from the WAL"
    )
    assert writer.failed is caught.value and "failed" in repr(writer)
    for call in (writer.sync, lambda: writer.append(b"three"), lambda: writer.append_many([b"x"])):
        with pytest.raises(WalSyncError):
            call()  # faults are off again: still refused, never retried
    assert writer.synced_lsn == 1
    writer.close()


def test_fault_budgets_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, "enospc_after=100,fsync_error_after=2")
    writer = WalWriter.create(str(tmp_path), 1)  # header: 32 bytes, one sync
    writer.append(b"x" * 20)  # 44 bytes
    writer.sync()
    with pytest.raises(WalWriteError):
        writer.append(b"y" * 20)
    with pytest.raises(WalSyncError):
        writer.sync()
    writer.close()
    monkeypatch.setenv(FAULTS_ENV, "nonsense")
    with pytest.raises(ValueError, match="cannot parse 'nonsense'"):
        WalWriter.create(str(tmp_path), 100)


def test_environment_faults_reach_a_separate_process(tmp_path):
    script = (
        "import sys\n"
        "from protobase.errors import WalSyncError\n"
        "from protobase.persistence.wal.writer import WalWriter\n"
        "writer = WalWriter.create(sys.argv[1], 1)\n"
        "writer.append(b'x')\n"
        "try:\n"
        "    writer.sync()\n"
        "except WalSyncError as error:\n"
        "    print('sync failed', error.errno)\n"
    )
    env = dict(os.environ, PROTOBASE_WAL_FAULTS="fsync_error_after=1")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"sync failed {errno.EIO}\n", "")


# --- directory -----------------------------------------------------------


def test_remove_wal_files_before(tmp_path):
    for first in (1, 11, 21):
        write_wal(tmp_path, first, 10)
    assert remove_wal_files_before(str(tmp_path), 9) == []
    assert remove_wal_files_before(str(tmp_path), 10) == [os.path.join(str(tmp_path), wal_file_name(1))]
    assert remove_wal_files_before(str(tmp_path), 1000) == [os.path.join(str(tmp_path), wal_file_name(11))]
    assert [first for first, _ in list_wal_files(str(tmp_path))] == [21]  # the last file always stays
    assert list(read_directory(str(tmp_path), 20))[0][0] == 21


def test_missing_records_between_files_are_reported(tmp_path):
    write_wal(tmp_path, 1, 5)
    write_wal(tmp_path, 9, 2)
    (tmp_path / "wal-notes.txt").write_text("ignored")
    with pytest.raises(
        CorruptionError,
        match=r"WAL records 6\.\.8 are missing: the WAL file .*wal-0+1\.log ends "
        r"at lsn 5, but the next one, .*wal-0+9\.log, starts at lsn 9\. "
        r".*put it back",
    ):
        list(read_directory(str(tmp_path)))
    assert [lsn for lsn, _ in read_directory(str(tmp_path), strict=False)] == [1, 2, 3, 4, 5]
    with pytest.raises(CorruptionError, match=r"WAL records 7\.\.8 are missing"):
        list(read_directory(str(tmp_path), 6))
    os.unlink(os.path.join(str(tmp_path), wal_file_name(1)))
    with pytest.raises(
        CorruptionError,
        match=r"WAL records 1\.\.8 are missing: recovery starts from the state at "
        r"lsn 0, but the first WAL file, .*wal-0+9\.log, starts at lsn 9",
    ):
        list(read_directory(str(tmp_path)))
    with pytest.raises(CorruptionError, match=r"starts from checkpoint X \(lsn 0\), but the first WAL file"):
        list(read_directory(str(tmp_path), origin="checkpoint X (lsn 0)"))
    assert [lsn for lsn, _ in read_directory(str(tmp_path), 8)] == [9, 10]


def test_a_gap_before_a_file_with_a_torn_header_is_reported(tmp_path):
    # A file shorter than its header holds no records, but its name proves where the log
    # went on: records 6..8 were lost before it, and skipping the file hid that.
    write_wal(tmp_path, 1, 5)
    path, _, _ = write_wal(tmp_path, 9, 2)
    os.truncate(path, FILE_HEADER_SIZE - 1)
    with pytest.raises(CorruptionError, match=r"WAL records 6\.\.8 are missing: .*wal-0+9\.log, starts at lsn 9"):
        list(read_directory(str(tmp_path)))
    os.rename(path, os.path.join(str(tmp_path), wal_file_name(6)))  # where the writer would have started it
    assert [lsn for lsn, _ in read_directory(str(tmp_path))] == [1, 2, 3, 4, 5]


# --- misuse --------------------------------------------------------------


def test_misuse_is_refused(tmp_path, monkeypatch):
    writer = WalWriter.create(str(tmp_path), 1)
    with pytest.raises(WalWriteError, match="cannot create WAL file .*File exists") as caught:
        WalWriter.create(str(tmp_path), 1)
    assert caught.value.errno == errno.EEXIST
    monkeypatch.setattr(writer_module, "MAX_PAYLOAD", 10)
    with pytest.raises(ValueError, match="over the 10-byte limit"):
        writer.append(b"x" * 11)
    assert writer.size == FILE_HEADER_SIZE
    writer.close()
    writer.close()
    assert "closed" in repr(writer)
    with pytest.raises(DatabaseClosedError, match="WAL writer for .* is closed"):
        writer.append(b"x")
    with pytest.raises(ValueError):
        WalWriter.create(str(tmp_path), 0)


def test_errors_cross_process_boundaries():
    error = pickle.loads(pickle.dumps(WalSyncError("fsync failed", errno.EIO)))
    assert (type(error), str(error), error.errno) == (WalSyncError, "fsync failed", errno.EIO)


def test_lsn_range_pattern_matches_exactly_the_range():
    import random

    rng = random.Random(7)
    for _ in range(500):
        low = rng.choice([rng.randrange(1, 300), rng.randrange(1, 1 << 40), rng.randrange(1, 1 << 63)])
        high = low + rng.randrange(0, 1 << rng.randrange(1, 30))
        pattern = lsn_range_regex(low, high)
        for value in (low, high, low - 1, high + 1, rng.randrange(low, high + 1), rng.randrange(0, 1 << 64)):
            assert bool(pattern.match(bytes(8) + value.to_bytes(8, "little"))) == (low <= value <= high)
    assert RECORD_HEADER_SIZE == 24


def test_fsync_error_while_creating_or_repairing(tmp_path):
    with inject_faults(sync_error=True):
        with pytest.raises(WalSyncError, match="cannot create WAL file"):
            WalWriter.create(str(tmp_path), 1)
    assert os.listdir(tmp_path) == []
    path, _, _ = write_wal(tmp_path, 1, 2)
    with open(path, "ab") as file:
        file.write(b"torn")
    with inject_faults(sync_error=True):
        with pytest.raises(WalSyncError, match="cannot repair the torn end of WAL file"):
            WalWriter.open_for_append(path)


def test_the_package_keeps_the_names_of_the_former_wal_module():
    # Scripts wrote `from protobase.persistence import wal; wal.scan(...)` when the WAL was one
    # module: each name it exported is the object its owning module defines now.
    from protobase import errors
    from protobase.persistence import wal

    assert wal.scan is scan and wal.WalWriter is WalWriter and wal.salvage_records is salvage_records
    assert wal.WalSyncError is errors.WalSyncError and wal.inject_faults is inject_faults
    assert all(hasattr(wal, name) for name in wal.__all__)
