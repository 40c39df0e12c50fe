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
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import DataDirectoryError

__all__ = ["DataDir", "FORMAT_VERSION", "FileLock"]

FORMAT_VERSION = 1
STAMP = "PROTOBASE"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, NUL included


@dataclass(frozen=True)
class DataDir:
    """A validated data directory (absolute path)."""

    path: str

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True) -> DataDir:
        """Validate (creating when allowed) the data directory at `path`."""
        path = os.path.abspath(os.fspath(path))
        if os.path.lexists(path) and not os.path.isdir(path):
            raise DataDirectoryError(f"{path} exists and is not a directory; pass a directory path")
        if not os.path.exists(path):
            if not create:
                raise DataDirectoryError(f"{path} does not exist")
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as error:
                raise DataDirectoryError(f"cannot create data directory {path}: {error.strerror}") from None
        directory = cls(path)
        directory._check_owner_and_mode()
        directory._check_or_write_stamp()
        return directory

    def _check_owner_and_mode(self) -> None:
        info = os.stat(self.path)
        if info.st_uid != os.getuid():
            raise DataDirectoryError(
                f"data directory {self.path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); "
                f"open it as its owner or copy it")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise DataDirectoryError(
                f"data directory {self.path} has mode {stat.S_IMODE(info.st_mode):o}, open to other users; "
                f"run `chmod 700 {self.path}`")

    def _check_or_write_stamp(self) -> None:
        stamp = os.path.join(self.path, STAMP)
        try:
            with open(stamp, encoding="utf-8") as file:
                found = json.load(file).get("format")
        except FileNotFoundError:
            # Another process may be writing the stamp right now (concurrent first opens):
            # its temporary file does not make the directory foreign.
            if [entry for entry in os.listdir(self.path) if not entry.startswith(STAMP + ".")]:
                if os.path.exists(stamp):  # it was written between our read and the listing
                    return self._check_or_write_stamp()
                raise DataDirectoryError(
                    f"{self.path} is not empty and has no {STAMP} stamp: it is not a ProtoBase data "
                    f"directory; pass an empty or new directory") from None
            self._write_stamp(stamp)
            return
        except (ValueError, AttributeError, OSError) as error:
            raise DataDirectoryError(f"cannot read {stamp} ({error}); it is damaged") from None
        if found != FORMAT_VERSION:
            raise DataDirectoryError(
                f"{self.path} holds format version {found}; this ProtoBase reads version "
                f"{FORMAT_VERSION}: open it with a matching ProtoBase release, or dump and load it")

    def _write_stamp(self, stamp: str) -> None:
        temporary = f"{stamp}.{os.getpid()}.tmp"  # per process: concurrent first opens each write their own
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump({"format": FORMAT_VERSION}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, stamp)
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


class FileLock:
    """An flock on a file in the data directory, released by the kernel if we die.

    Opened with O_CLOEXEC so a child we spawn does not inherit (and pin) it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
