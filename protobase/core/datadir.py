"""The data directory: where a database lives on disk, and who may use it.

Owns the directory's layout and its safety checks. The directory is created
0700 and must stay owned by the user and closed to others: it holds the
coordinator's socket, whose only protection is the directory's mode. A stamp
file records the format version, so a directory of another version is refused
before anything in it is touched.

    PROTOBASE       format stamp: JSON {"format": N}
    coordinator.sock    Unix socket of the running coordinator
    coordinator.lock    flock held by the running coordinator for its lifetime
    launch.lock         flock held by whoever is starting a coordinator
    instance            id of the running (or last crashed) shared-memory instance
    coordinator.log     the coordinator's stderr

Runs in every process that opens a directory: clients validate it and take
launch.lock to start a coordinator (client/launcher.py), the coordinator
holds coordinator.lock and writes the instance file, the persistence process
and the CLI read it.

Invariant: nothing is read or written in a directory until `DataDir.open`
has checked its owner, its mode and its stamp; a `FileLock` is an flock on a
descriptor opened O_CLOEXEC, so a forked child never keeps it held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from protobase.errors import DataDirectoryError

__all__ = ["DataDir", "FORMAT_VERSION", "FileLock"]

FORMAT_VERSION = 1
STAMP = "PROTOBASE"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, NUL included


@dataclass(frozen=True)
class DataDir:
    """A validated data directory (absolute path)."""

    path: str

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> DataDir:
        """Validate the data directory at `path`; with `create`, make it one if it is missing or empty.

        Without `create` nothing is written: the directory must exist and
        carry the stamp. Raises DataDirectoryError for an empty path (never
        taken to mean the current directory), a file, a directory that cannot
        be created or written, another owner, loose permissions, or another
        format version, saying what to do.
        """
        if not os.fspath(path):
            raise DataDirectoryError(
                "the data directory path is empty; pass the directory's path (for the current directory, pass '.')"
            )
        path = os.path.abspath(os.fspath(path))
        if os.path.lexists(path) and not os.path.isdir(path):
            raise DataDirectoryError(f"{path} exists and is not a directory; pass a directory path")
        if not os.path.exists(path):
            if not create:
                raise DataDirectoryError(
                    f"data directory {path} does not exist; check the path (only an open "
                    f"that may create it and start its coordinator makes one)"
                )
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as error:
                parent = os.path.dirname(error.filename or path)  # the first ancestor makedirs could not make
                raise _write_error(parent, error, f"create data directory {path}") from None
        directory = cls(path)
        directory._check_owner_and_mode()
        if create:
            directory._check_writable()
        directory._check_or_write_stamp(create)
        return directory

    def _check_writable(self) -> None:
        """Refuse a directory we cannot create files in: its coordinator could not even take its lock.

        Checked up front, where the user named the directory; a coordinator
        started on it would fail later with a bare permission error.
        """
        if os.access(self.path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            return
        code = errno.EROFS if os.statvfs(self.path).f_flag & os.ST_RDONLY else errno.EACCES
        raise _write_error(self.path, OSError(code, os.strerror(code)), f"write in data directory {self.path}")

    def _check_owner_and_mode(self) -> None:
        info = os.stat(self.path)
        if info.st_uid != os.getuid():
            raise DataDirectoryError(
                f"data directory {self.path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); "
                f"open it as its owner or copy it"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise DataDirectoryError(
                f"data directory {self.path} has mode {stat.S_IMODE(info.st_mode):o}, open to other users; "
                f"run `chmod 700 {self.path}`"
            )

    def _check_or_write_stamp(self, create: bool) -> None:
        stamp = os.path.join(self.path, STAMP)
        try:
            with open(stamp, encoding="utf-8") as file:
                found = json.load(file).get("format")
        except FileNotFoundError:
            # Another process may be writing the stamp right now (concurrent first opens):
            # its temporary file does not make the directory foreign.
            if [entry for entry in os.listdir(self.path) if not entry.startswith(STAMP + ".")]:
                if os.path.exists(stamp):  # it was written between our read and the listing
                    return self._check_or_write_stamp(create)
                raise DataDirectoryError(
                    f"{self.path} is not empty and has no {STAMP} stamp: it is not a ProtoBase data "
                    f"directory; pass an empty or new directory"
                ) from None
            if not create:
                raise DataDirectoryError(
                    f"{self.path} is not a ProtoBase data directory (it has no {STAMP} stamp); check the path "
                    f"(only an open that may create it and start its coordinator makes one)"
                ) from None
            self._write_stamp(stamp)
            return
        except (ValueError, AttributeError, OSError) as error:
            raise DataDirectoryError(f"cannot read {stamp} ({error}); it is damaged") from None
        if found != FORMAT_VERSION:
            raise DataDirectoryError(
                f"{self.path} holds format version {found}; this ProtoBase reads version "
                f"{FORMAT_VERSION}: open it with a matching ProtoBase release, or dump and load it"
            )

    def _write_stamp(self, stamp: str) -> None:
        temporary = f"{stamp}.{os.getpid()}.tmp"  # per process: concurrent first opens each write their own
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump({"format": FORMAT_VERSION}, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, stamp)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise _write_error(self.path, error, f"write {stamp}") from None
        self.fsync()

    def fsync(self) -> None:
        """fsync the directory itself, so created and renamed entries survive a crash."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def wait_until_unserved(self, timeout: float = 15.0) -> bool:
        """Wait until no coordinator serves this directory; True if none does.

        A coordinator holds `coordinator.lock` for its whole life, so the lock
        being free means it has exited (its shared memory already removed).
        """
        lock = FileLock(self.file("coordinator.lock"))
        deadline = time.monotonic() + timeout
        while not lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        lock.release()
        return True

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def socket_path(self) -> str:
        return self.file("coordinator.sock")

    @contextmanager
    def socket_address(self) -> Iterator[str]:
        """An address for bind/connect to our socket, even when the path is too long for one.

        sun_path holds 107 bytes; a longer path is reached through a descriptor
        of the directory (/proc/self/fd/N/coordinator.sock), which Linux resolves.
        """
        if len(self.socket_path.encode()) <= MAX_SOCKET_PATH:
            yield self.socket_path
            return
        fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}/coordinator.sock"
        finally:
            os.close(fd)

    def read_instance(self) -> str | None:
        try:
            with open(self.file("instance"), encoding="ascii") as file:
                return file.read().strip() or None
        except FileNotFoundError:
            return None

    def write_instance(self, instance_id: str | None) -> None:
        path = self.file("instance")
        if instance_id is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="ascii") as file:
            file.write(instance_id)
        os.replace(temporary, path)


def _write_error(directory: str, error: OSError, action: str) -> DataDirectoryError:
    """The DataDirectoryError for failing to `action` in `directory`: what failed, and what to do about it."""
    if error.errno == errno.EROFS:
        remedy = (
            f"{directory} is on a read-only filesystem: remount it read-write, or copy the database to a "
            f"writable filesystem and open the copy"
        )
    elif error.errno in (errno.EACCES, errno.EPERM):
        remedy = f"make {directory} writable for you (`chmod u+w {directory}`), or open a copy in a writable place"
    else:
        remedy = "free space on its filesystem (or check the device), then open it again"
    return DataDirectoryError(
        f"cannot {action} ({error.strerror}): ProtoBase writes its lock files, socket and "
        f"write-ahead log in the data directory, even to read it; {remedy}"
    )


class FileLock:
    """An flock on a file in the data directory, released by the kernel if we die.

    Opened with O_CLOEXEC so a child we spawn does not inherit (and pin) it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; False if `blocking` is off and another process holds it.

        Raises DataDirectoryError when the lock file cannot be opened (a
        read-only directory or filesystem).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise _write_error(os.path.dirname(self.path), error, f"open the lock file {self.path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
