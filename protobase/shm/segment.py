"""One POSIX shared memory segment, mapped into this process.

Owns: creating, attaching, mapping, closing and unlinking a segment. A segment
is a fixed-size run of bytes with no format of its own; the modules that lay
bytes in it (`control.py`, the data arenas) own and document their formats.

Invariants:
- A segment is created exclusively (O_CREAT | O_EXCL) with mode 0600, whatever
  the umask, and its pages are reserved with ``posix_fallocate`` before it is
  mapped: on a full tmpfs creation fails cleanly with ProtoBaseError, instead
  of the process dying of SIGBUS when it first touches an unbacked page.
- The descriptor is closed as soon as the mapping exists; the mapping keeps
  the memory alive, and no descriptor leaks into forked children.
- Only the owner unlinks. `unlink` is for the coordinator, which created the
  segment; attaching processes only ever `close`. Nothing here registers a
  segment with anything that could unlink it behind our back (this is why we
  use posix_ipc and never ``multiprocessing.shared_memory``, whose resource
  tracker unlinks segments other processes still use: CPython gh-82300).

Callers: the coordinator creates (read-write) and unlinks; workers attach,
read-only unless they have a reason to write (the control segment).

Fault injection for tests goes through the real code path: every reservation
passes through `_fallocate`, which the environment variable
``PROTOBASE_SHM_FAULTS=enospc_after=N`` (read in the process that creates
segments, so a coordinator started by the test inherits it) makes fail with
ENOSPC once the segments this process reserved would exceed N bytes: a
/dev/shm that is full.
"""

from __future__ import annotations

import errno
import mmap
import os

import posix_ipc

from protobase.errors import (
    CoordinatorError,
    CorruptionError,
    DatabaseClosedError,
    ProtoBaseError,
)

__all__ = ["Segment", "FAULTS_ENV"]

_MODE = 0o600
FAULTS_ENV = "PROTOBASE_SHM_FAULTS"


class Segment:
    """A mapped POSIX shared memory segment. Make one with `create` or `attach`.

    ``buf`` is a memoryview over the whole mapping: read-only unless the
    segment was created or attached writable, so a stray write from a worker
    raises TypeError instead of corrupting shared data.
    """

    def __init__(self, name: str, mapping: mmap.mmap, *, writable: bool) -> None:
        """Wrap an existing mapping. Internal: use `Segment.create` or `Segment.attach`."""
        self.name = name  # the POSIX name, with its leading slash
        self.size = len(mapping)  # bytes, fixed for the segment's life
        self.writable = writable  # True when mapped PROT_READ | PROT_WRITE
        self._mmap: mmap.mmap | None = mapping  # None once closed
        self._buf: memoryview | None = memoryview(mapping)  # None once closed

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create a new segment of *size* bytes, zero-filled, mapped read-write.

        Coordinator only. The name must not exist yet: names come from a fresh
        random instance id, so an existing one means a bug or a hostile
        pre-created segment, and we refuse to use it.

        Raises ValueError if *size* is not positive; ProtoBaseError if the
        name exists, or if /dev/shm has no room for *size* bytes (nothing is
        left behind in that case).
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=_MODE, size=0)
        except posix_ipc.ExistentialError:
            raise ProtoBaseError(
                f"shared memory segment {name} already exists; segment names come from a "
                f"random instance id, so another process created it: refusing to use it"
            ) from None
        try:
            # shm_open applied the umask; a 0600 we set ourselves is exact.
            os.fchmod(shm.fd, _MODE)
            _reserve(shm.fd, name, size)
            mapping = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            # Half-made: we created it, so we own it and must remove it.
            _unlink_quietly(name)
            raise
        finally:
            shm.close_fd()
        return cls(name, mapping, writable=True)

    @classmethod
    def attach(cls, name: str, *, writable: bool = False) -> Segment:
        """Map an existing segment, read-only unless *writable*.

        Any process. Never unlinks; `close` it when done.

        Raises CoordinatorError if the segment does not exist (the coordinator
        has exited or restarted) or belongs to another user; CorruptionError
        if it is empty (never reserved, so it was not made by a coordinator).
        """
        try:
            shm = posix_ipc.SharedMemory(name, 0, read_only=not writable)
        except posix_ipc.ExistentialError:
            raise CoordinatorError(
                f"shared memory segment {name} is gone: the coordinator has exited or "
                f"restarted, or compacted it away after the snapshot that read this value was closed; "
                f"take a new snapshot (a database handle reattaches by itself)"
            ) from None
        except posix_ipc.PermissionsError:
            raise CoordinatorError(
                f"permission denied on shared memory segment {name}: it belongs to another "
                f"user; open the database as the user that runs its coordinator"
            ) from None
        try:
            size = os.fstat(shm.fd).st_size
            if size == 0:
                raise CorruptionError(f"shared memory segment {name} is empty (0 bytes)")
            prot = mmap.PROT_READ | mmap.PROT_WRITE if writable else mmap.PROT_READ
            mapping = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, prot)
        finally:
            shm.close_fd()
        return cls(name, mapping, writable=writable)

    @property
    def buf(self) -> memoryview:
        """The whole segment as a memoryview. Raises DatabaseClosedError once closed."""
        if self._buf is None:
            raise DatabaseClosedError(f"shared memory segment {self.name} is closed")
        return self._buf

    @property
    def closed(self) -> bool:
        """True once `close` has been called."""
        return self._mmap is None

    def close(self) -> None:
        """Unmap the segment from this process. Idempotent; never unlinks.

        If views into the segment are still alive elsewhere (decoded objects
        and caches hold memoryview slices of atoms), the mapping cannot be
        unmapped now: mmap refuses with BufferError. Forcing it would turn
        every later read through those views into a SIGSEGV, so we just drop
        our references and let the mapping go when the last view does.
        """
        buf, mapping = self._buf, self._mmap
        self._buf = self._mmap = None
        if mapping is None or buf is None:  # both are None together: closed already
            return
        try:
            buf.release()
        except BufferError:
            pass  # someone holds a buffer export of this very view; see above
        try:
            mapping.close()
        except BufferError:
            pass  # slices of the mapping are still alive; see above

    def unlink(self) -> bool:
        """Remove the segment's name so no one can attach any more. Owner (coordinator) only.

        Processes that have it mapped keep their mapping; the memory is freed
        when the last one unmaps. Returns False if the name was already gone.
        """
        return _unlink_quietly(self.name)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open read-write" if self.writable else "open read-only")
        return f"<Segment {self.name} size={self.size} {state}>"


def _reserve(fd: int, name: str, size: int) -> None:
    # ftruncate alone would make a sparse file; tmpfs then allocates a page at
    # first touch and, when full, kills us with SIGBUS. fallocate allocates now.
    try:
        _fallocate(fd, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise ProtoBaseError(
                f"shared memory (/dev/shm) is full: could not reserve {size} bytes for "
                f"segment {name} ({exc.strerror}); free space in /dev/shm or raise the "
                f"tmpfs size (mount -o remount,size=... /dev/shm, or docker --shm-size)"
            ) from exc
        raise ProtoBaseError(f"could not reserve {size} bytes for shared memory segment {name}: {exc}") from exc


class _Faults:
    """The reservation budget `FAULTS_ENV` sets for this process (tests only)."""

    def __init__(self) -> None:
        self.applied = ""  # the FAULTS_ENV value the budget comes from
        self.budget: int | None = None  # bytes `_fallocate` may still reserve; None: no limit

    def apply(self, value: str) -> None:
        if value == self.applied:
            return
        key, _, number = value.partition("=")
        if value and (key != "enospc_after" or not number.isdigit()):
            raise ValueError(f"{FAULTS_ENV}={value!r}: cannot parse it; use enospc_after=N (bytes)")
        self.applied, self.budget = value, int(number) if value else None


_faults = _Faults()


def _fallocate(fd: int, size: int) -> None:
    """os.posix_fallocate of the whole segment, unless `FAULTS_ENV` says /dev/shm is full."""
    _faults.apply(os.environ.get(FAULTS_ENV, ""))
    if _faults.budget is not None:
        if size > _faults.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
        _faults.budget -= size
    os.posix_fallocate(fd, 0, size)


def _unlink_quietly(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
