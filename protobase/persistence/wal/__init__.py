"""The write-ahead log: its byte format and all WAL file I/O, one module per concept.

Owns the files ``wal-<first_lsn as 16 hex digits>.log`` in the data
directory. Each holds a run of records with consecutive log sequence numbers
(LSNs); the files of a directory continue each other. A payload is opaque
bytes: what a record means is the business of the persistence process and of
recovery.

The persistence process is the only writer (`writer.WalWriter`), one at a
time, guarded by its ``wal.lock``. Recovery in the coordinator, `check` and
tools read (`reader.scan`, `read_records`, `read_directory`; `salvage` for
`protobase recover`). Nothing here takes a lock.

Modules, bottom-up:

- `format`   the byte format (spec in its docstring), the record checksum
- `files`    file names, listing, removal, directory fsync
- `faults`   fault injection through the real write and sync paths (tests)
- `search`   finding the next valid record after damage
- `reader`   validating a file or a directory: torn tail versus damage
- `salvage`  every intact record of a damaged file
- `writer`   appending, group commit, fsync, preallocation

This package re-exports the names callers used when the WAL was one module
(`from protobase.persistence import wal; wal.scan(...)`); code inside
ProtoBase imports from the module that owns a name. The errors live in
protobase.errors (`WalError`, `WalWriteError`, `WalSyncError`).
"""

from protobase.errors import WalError, WalSyncError, WalWriteError
from protobase.persistence.wal.faults import FAULTS_ENV, inject_faults
from protobase.persistence.wal.files import (
    fsync_directory,
    list_wal_files,
    parse_wal_file_name,
    remove_wal_files_before,
    wal_file_name,
)
from protobase.persistence.wal.format import FILE_HEADER_SIZE, MAGIC, MAX_PAYLOAD, RECORD_HEADER_SIZE, VERSION
from protobase.persistence.wal.reader import ScanResult, WalReader, WalRecord, read_directory, read_records, scan
from protobase.persistence.wal.salvage import salvage_records
from protobase.persistence.wal.writer import PREALLOCATE_BYTES, WalWriter

__all__ = [
    "MAGIC",
    "VERSION",
    "FILE_HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "MAX_PAYLOAD",
    "PREALLOCATE_BYTES",
    "FAULTS_ENV",
    "WalError",
    "WalWriteError",
    "WalSyncError",
    "WalRecord",
    "ScanResult",
    "WalReader",
    "WalWriter",
    "scan",
    "read_records",
    "read_directory",
    "salvage_records",
    "wal_file_name",
    "parse_wal_file_name",
    "list_wal_files",
    "remove_wal_files_before",
    "fsync_directory",
    "inject_faults",
]
