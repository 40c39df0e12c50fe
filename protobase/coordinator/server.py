"""The coordinator: the one process that writes a database's shared memory.

Owns the instance: its control segment, its data segments, the socket, the
published root and the version table. One runs per data directory, guarded by
an flock on `coordinator.lock`. It serves clients over the Unix socket in a
single-threaded event loop, which is what serialises commits: each commit is
validated (conflicts.py), applied by path copying (writer.py), written to
atoms, and handed to the persistence process through the commit ring
(durability.py).

Durability: a "sync" commit is acknowledged, and its root published, only once
its WAL record is fsynced, so no snapshot ever shows a commit that a crash
could take back; concurrent sync commits share one fsync. An "async" commit
is published and acknowledged at once; the persistence process fsyncs it
within `flush_interval`. On start, the state is recovered from the newest
checkpoint and the WAL (recovery.py); on a clean stop a final checkpoint is
written, so the next start replays nothing.

Reclamation is a copying compaction: once the bytes appended since the last
compaction exceed the live bytes then (and `compact_min_bytes`), every atom
reachable from the root is copied into fresh segments and the new root is
published; the old segments are unlinked as soon as the copy is published and
no reader's snapshot (nor a checkpoint being written) is older than it. A
compaction is all or nothing: one that fails (/dev/shm full) unlinks its
half-built copy and leaves the root, the generation and the retired segments
as they were. While a reader still pins the previous compaction's segments, no
automatic compaction starts (it could free nothing). Readers that die (kill -9)
are dropped when their socket closes, and their reader slots are reaped by pid
and start time; a reader that is alive but stopped is named by `stats()`
(`oldest_reader`).

Running out of file descriptors refuses connections (with an error reply when
a spare descriptor allows it) and never stops the coordinator.

Invariants: only this process creates, writes or unlinks the instance's
segments; published roots only ever point into live segments; after `stop`
nothing of the instance is left in /dev/shm.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from protobase.coordinator.conflicts import VersionTable
from protobase.coordinator.durability import Durability, DurabilityFailed
from protobase.coordinator.recovery import recover
from protobase.coordinator.writer import Writer, decode_ops
from protobase.core import codec
from protobase.core.arena import ArenaWriter, AtomReader, segment_of
from protobase.core.datadir import FORMAT_VERSION, STAMP, DataDir, FileLock
from protobase.core.store import Store
from protobase.errors import (
    CoordinatorError,
    CorruptionError,
    DataDirectoryError,
    PathError,
    ProtoBaseError,
    ProtocolError,
)
from protobase.keyorder import check_key
from protobase.shm import names
from protobase.shm.control import DEFAULT_READER_SLOTS, ControlBlock, process_start_time
from protobase.wire.counters import Counters, OldestReaderCounters
from protobase.wire.error_table import error_fields, error_reply
from protobase.wire.framing import FrameReader, peer_credentials, send
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_DELETE,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_DROP_INDEX,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)
from protobase.wire.verbs import PUSH, MalformedRequest, parse_request

__all__ = ["Coordinator", "LOCK_WAIT"]

log = logging.getLogger("protobase.coordinator")

TICK = 0.2  # seconds between housekeeping passes
LOCK_WAIT = 30.0  # seconds a new coordinator waits for a stopping one to let go
FIRST_CLIENT_WAIT = 10.0  # seconds a new coordinator waits for its first client, whatever its grace
DEFAULT_COMPACT_MIN_BYTES = 64 << 20
DEFAULT_CHECKPOINT_BYTES = 64 << 20
DEFAULT_FLUSH_INTERVAL = 0.01
DURABILITY_MODES = ("sync", "async")
STOP_TIMEOUT = 120.0  # seconds a clean stop waits for its final checkpoint
RECEIVE_BYTES = 1 << 20  # read from a client at a time
MAX_BUFFERED_BYTES = 512 << 20  # incomplete requests held for all clients together
PARTIAL_FRAME_TIMEOUT = 30.0  # seconds a client may leave a request half-sent before we hang up
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # accept errors that refuse


_OP_ARGUMENT_TYPES: dict[int, tuple[type, ...]] = {  # {op code -> what its argument may be}
    OP_SET: (object,), OP_DELETE: (type(None),), OP_LIST: (list,), OP_SET_ADD: (list,), OP_SET_DISCARD: (list,),
    OP_CREATE_INDEX: (str, tuple), OP_DROP_INDEX: (str, tuple),
}
_LIST_OP_CODES = (LIST_APPEND, LIST_SET, LIST_INSERT, LIST_DELETE)


def parse_ops(ops_bytes: bytes) -> list[list]:
    """A commit's ops, decoded, each checked to be [known code, key path, argument of that code's type].

    Raises ProtocolError (nothing applied) for ops no client of ours sends,
    EncodingError for a key no stored dict may have and for an internal
    reference (see `decode_ops`).
    """
    try:
        ops = decode_ops(ops_bytes)
    except CorruptionError as error:
        raise ProtocolError(f"malformed request: the commit's ops cannot be decoded ({error})") from None
    if type(ops) is not list or not ops:
        raise ProtocolError("malformed request: a commit's ops are a non-empty array")
    for op in ops:
        if type(op) is not list or len(op) != 3 or type(op[0]) is not int or type(op[1]) is not list:
            raise ProtocolError("malformed request: an op is [code, key path, argument]")
        code, path, argument = op
        if code not in _OP_ARGUMENT_TYPES or not isinstance(argument, _OP_ARGUMENT_TYPES[code]):
            raise ProtocolError(f"malformed request: op code {code} with an argument of type "
                                f"{type(argument).__name__} is not an operation")
        for key in path:
            check_key(key, tuple(path))
        if code == OP_LIST and not all(type(item) is list and len(item) == 3 and item[0] in _LIST_OP_CODES
                                       for item in argument):
            raise ProtocolError("malformed request: a list operation is [code, index, value]")
    return ops


class Client:
    """One connected client process."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid  # from SO_PEERCRED
        self.reader = FrameReader()
        self.partial_since = 0.0  # time.monotonic() when its incomplete request began
        self.slot: int | None = None  # reader-table slot, once it said hello
        self.watching: list[tuple] | None = None  # key-path prefixes it watches, if it is a watcher


@dataclass(frozen=True)
class Asker:
    """Whom to answer: a client, and the id of its request (PUSH for what we send unasked)."""

    client: Client
    request_id: int


@dataclass
class Pending:
    """A root waiting for its WAL record to be durable before it is published (and acknowledged)."""

    lsn: int
    seq: int
    root: int
    asker: Asker | None  # whom to answer, None for a compaction
    reply: list | None
    paths: list[tuple] = field(default_factory=list)  # what the commit wrote, for watchers


class Coordinator:
    """Serves one data directory until the last client has gone (or forever)."""

    def __init__(self, datadir: DataDir, *, grace: float | None = 2.0,
                 compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
                 checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, reader_slots: int = DEFAULT_READER_SLOTS) -> None:
        self.datadir = datadir
        self.grace = grace  # seconds to linger with no client; None: serve forever
        self.compact_min_bytes = compact_min_bytes
        self.checkpoint_bytes = checkpoint_bytes  # WAL bytes that trigger a checkpoint
        self.flush_interval = flush_interval
        self.reader_slots = reader_slots  # database handles that can be attached at once
        self.lock = FileLock(datadir.file("coordinator.lock"))
        self.instance_id = names.new_instance_id()
        self.control: ControlBlock | None = None
        self.arena: ArenaWriter | None = None
        self.writer: Writer | None = None
        self.durability: Durability | None = None
        self.listener: socket.socket | None = None
        self.selector = selectors.DefaultSelector()
        self.receive_buffer = bytearray(RECEIVE_BYTES)
        self.receive_view = memoryview(self.receive_buffer)
        self.watched_persistence: socket.socket | None = None  # the persistence socket in the selector
        self.clients: dict[socket.socket, Client] = {}  # {connection -> client}
        self.buffered_bytes = 0  # bytes of incomplete requests held for all clients
        self.versions = VersionTable()
        self.seq = 0  # sequence number of the latest commit (maybe not yet published)
        self.root = 0  # its root pointer
        self.published_seq = 0  # sequence number of the published root
        self.pending: collections.deque[Pending] = collections.deque()  # in LSN order
        self.live_after_compaction = 0  # bytes copied by the last compaction
        self.allocated_at_compaction = 0  # arena.allocated_bytes right after it
        self.discarded_at_compaction = 0  # writer.discarded_bytes right after it
        self.next_compaction_attempt = 0  # arena.allocated_bytes before which no automatic compaction is tried
        self.retired: list[tuple[int, int]] = []  # [(publish seq, first live segment)] awaiting unlink
        # {reader slot -> (pid, snapshot seq, time.monotonic() we first saw it hold that snapshot)}
        self.pins_seen: dict[int, tuple[int, int, float]] = {}
        # Checkpoints (and backups) asked of the persistence process, in ring order:
        # [(seq it pins, asker to answer or None)]; their segments must stay alive.
        self.checkpoint_requests: collections.deque[tuple[int, Asker | None]] = collections.deque()
        self.changed_since_checkpoint = False
        self.commits = 0
        self.conflicts = 0
        self.compactions = 0
        self.compaction_failures = 0  # compactions undone (/dev/shm full, ...) since start
        self.checkpoints = 0
        self.recovered = None
        self.idle_since: float | None = time.monotonic()
        self.housekept_at = 0.0  # time.monotonic() of the last housekeeping pass

        self.accepted = 0  # connections accepted since start: the grace only counts once one came
        # A descriptor held in reserve: out of them, closing it lets us accept a connection just to refuse it.
        self.spare_fd: int | None = None
        self.accept_paused = False  # True while the listener is out of the selector (out of descriptors)
        self.short_of_descriptors = False  # True from a failed accept to the next successful one
        self.refusing_commits = False  # True once durability failed: every commit is refused from then on
        self.running = False

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Take the directory, sweep a crashed instance, recover, start persistence, listen."""
        self._acquire(self.lock, "another coordinator serves it")
        try:
            self._sweep_previous_instance()
            pid = os.getpid()
            self.control = ControlBlock.create(names.control_name(self.instance_id), reader_slots=self.reader_slots,
                                               coordinator_pid=pid, coordinator_start=process_start_time(pid))
            self.datadir.write_instance(self.instance_id)
            self.arena = ArenaWriter(self.instance_id, self._on_new_segment)
            self.writer = Writer(self.arena, Store(AtomReader(self.instance_id, writer=self.arena)))
            self._recover()
            self._listen()
        except BaseException:
            self._release_shared_memory()
            self.lock.release()
            raise
        self.running = True
        log.info("coordinator %d serving %s (instance %s)", os.getpid(), self.datadir.path, self.instance_id)

    def _acquire(self, lock: FileLock, holder: str) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        while not lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise CoordinatorError(f"{lock.path} is still held after {LOCK_WAIT}s: {holder}")
            time.sleep(0.02)

    def _recover(self) -> None:
        wal_lock = FileLock(self.datadir.file("wal.lock"))
        self._acquire(wal_lock, "a persistence process still writes the WAL")
        try:
            self.recovered = recover(self.datadir.path, self.arena, self.writer)
        finally:
            wal_lock.release()
        self.seq, self.root = self.recovered.seq, self.recovered.root
        # Commits before the restart are not in the version table: a transaction
        # based on one of them cannot be checked, so it is refused as a conflict.
        self.versions.horizon = self.seq
        self._publish(self.seq, self.root)
        self.live_after_compaction = self.allocated_at_compaction = self.arena.allocated_bytes
        self.durability = Durability(self.datadir, self.instance_id, self.control, next_lsn=self.recovered.lsn + 1,
                                     flush_interval=self.flush_interval)
        self.durability.start()
        try:
            self.durability.wait_started()
        except DurabilityFailed as error:
            self.durability.stop()
            raise CoordinatorError(f"cannot write the write-ahead log of {self.datadir.path}: {error}") from None
        self._watch_persistence()
        self.changed_since_checkpoint = self.recovered.replayed > 0

    def _sweep_previous_instance(self) -> None:
        previous = self.datadir.read_instance()
        if previous and names.is_instance_id(previous):
            removed = names.sweep(previous)
            if removed:
                log.warning("removed %d segments left by crashed instance %s", len(removed), previous)

    def _listen(self) -> None:
        path = self.datadir.socket_path
        try:
            os.unlink(path)  # a dead coordinator's socket: we hold the lock, so it is stale
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600
        try:
            with self.datadir.socket_address() as address:
                listener.bind(address)
        finally:
            os.umask(old_umask)
        listener.listen(128)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ)
        self.listener = listener
        self.spare_fd = _spare_descriptor()

    def serve_forever(self) -> None:
        """Run the event loop until stopped, then release everything."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._request_stop())
        try:
            while self.running:
                for key, _ in self.selector.select(TICK):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self.watched_persistence:
                        self._on_persistence_report()
                    elif key.fileobj in self.clients:
                        self._read(key.fileobj)
                now = time.monotonic()
                if now - self.housekept_at >= TICK:  # not on every wake-up: it scans the reader table
                    self.housekept_at = now
                    self._housekeeping()
        except Exception:
            log.exception("the coordinator's event loop failed; stopping")
            raise
        finally:
            self.stop()

    def _request_stop(self) -> None:
        self.running = False

    def stop(self) -> None:
        """Checkpoint, stop persistence, close every connection, remove the instance from /dev/shm."""
        self.running = False
        if self.control is None:
            return
        self.control.shutting_down = True
        if self.listener is not None:
            if not self.accept_paused:
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.datadir.socket_path)
            except FileNotFoundError:
                pass
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        self._final_checkpoint()
        for sock in list(self.clients):
            self._drop(sock)
        if self.durability is not None:
            self.durability.stop()
        self._release_shared_memory()
        self.datadir.write_instance(None)
        self.lock.release()
        log.info("coordinator %d stopped", os.getpid())

    def _final_checkpoint(self) -> None:
        """On a clean stop: checkpoint, and wait until it and every pending commit are durable."""
        if self.durability is None or self.durability.failure:
            return
        if self.changed_since_checkpoint or self.pending:
            self._checkpoint()
        deadline = time.monotonic() + STOP_TIMEOUT
        while (self.pending or self.checkpoint_requests) and not self.durability.failure:
            if time.monotonic() > deadline:
                log.error("the final checkpoint did not finish in %ss; the WAL still holds every commit",
                          STOP_TIMEOUT)
                return
            if self.durability.sock is not None:
                select.select([self.durability.sock], [], [], TICK)
            self._on_persistence_report()

    def _release_shared_memory(self) -> None:
        if self.arena is not None:
            self.arena.close(unlink=True)
            self.arena = None
        if self.control is not None:
            self.control.unlink()
            self.control.close()
            self.control = None
        names.sweep(self.instance_id)

    # -- connections --------------------------------------------------------------

    def _accept(self) -> None:
        """Take one connection; out of descriptors (or any accept error), refuse it and keep serving."""
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno in OUT_OF_DESCRIPTORS:
                self._refuse_for_lack_of_descriptors(error)
            else:  # ECONNABORTED, EPROTO, EPERM...: that connection is gone, the next ones are not
                log.warning("could not accept a connection (%s); still serving", error)
            return
        try:
            pid, uid, _ = peer_credentials(sock)
        except OSError as error:  # it hung up already
            log.warning("dropped a connection whose peer could not be identified (%s)", error)
            sock.close()
            return
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (pid %d)", uid, pid)
            sock.close()
            return
        self.short_of_descriptors = False
        sock.setblocking(False)  # no poll before each recv and send; `send` bounds a stalled client
        self.clients[sock] = Client(sock, pid)
        self.selector.register(sock, selectors.EVENT_READ)
        self.idle_since = None
        self.accepted += 1

    def _refuse_for_lack_of_descriptors(self, error: OSError) -> None:
        """Accept with the spare descriptor just to answer and close; else stop accepting for one tick.

        The refused connection stays in the listen backlog and keeps the
        listener readable: without taking it off, the loop would spin.
        """
        refused = None
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                refused, _ = self.listener.accept()
            except OSError:
                refused = None
        if refused is not None:
            message = (f"the coordinator of {self.datadir.path} (pid {os.getpid()}) is out of file descriptors "
                       f"({error.strerror}) and refused this connection; close idle database handles, or raise "
                       f"its limit (ulimit -n, LimitNOFILE= for systemd), then open the database again")
            try:
                refused.setblocking(False)
                send(refused, [PUSH, *error_fields(CoordinatorError, message)])
            except OSError:
                pass  # it is refused either way
            refused.close()
            log.error("refused a connection: out of file descriptors (%s); still serving %d clients",
                      error.strerror, len(self.clients))
        else:
            self.selector.unregister(self.listener)
            self.accept_paused = True
            if not self.short_of_descriptors:  # once, not on every retry
                log.error("out of file descriptors (%s), even with the spare one closed: new connections wait "
                          "until some are free; still serving %d clients", error.strerror, len(self.clients))
        self.short_of_descriptors = True
        self.spare_fd = _spare_descriptor()

    def _resume_accepting(self) -> None:
        if self.accept_paused and self.listener is not None:
            self.accept_paused = False
            self.selector.register(self.listener, selectors.EVENT_READ)
        if self.spare_fd is None:
            self.spare_fd = _spare_descriptor()

    def _read(self, sock: socket.socket) -> None:
        """Serve what a client sent. Nothing it sends can stop the loop: at worst its connection is closed."""
        client = self.clients[sock]
        try:
            # Into one reused buffer: a fresh 1 MiB bytes per recv costs mmap, mremap and munmap.
            try:
                received = sock.recv_into(self.receive_buffer)
            except BlockingIOError:
                return
            if not received:
                raise ConnectionResetError
            bodies = self._take_frames(client, self.receive_view[:received])
        except (OSError, CoordinatorError):
            self._drop(sock)
            return
        except ProtocolError as error:  # a frame we cannot skip, or a client over its memory bound
            log.warning("closing the connection of client %d: %s", client.pid, error)
            self._answer(Asker(client, PUSH), error_reply(error))
            self._drop(sock)
            return
        for body in bodies:
            self._serve(client, body)

    def _take_frames(self, client: Client, data: memoryview) -> list[bytes]:
        """The frames `data` completes; ProtocolError if buffering the rest would pass our memory bounds."""
        before = client.reader.buffered
        try:
            bodies = client.reader.feed_bodies(data)
        finally:
            self.buffered_bytes += client.reader.buffered - before
        if client.reader.buffered and not before:
            client.partial_since = time.monotonic()
        if self.buffered_bytes > MAX_BUFFERED_BYTES and client.reader.buffered:
            raise ProtocolError(
                f"the coordinator holds {self.buffered_bytes} bytes of incomplete requests, over its "
                f"{MAX_BUFFERED_BYTES}-byte bound; send smaller commits (split the transaction)")
        return bodies

    def _serve(self, client: Client, body: bytes) -> None:
        """Parse and handle one request, and answer it (now, or later for what waits on the disk)."""
        try:
            request_id, verb, arguments = parse_request(body)
        except MalformedRequest as error:
            log.warning("client %d: %s", client.pid, error)
            self._answer(Asker(client, error.request_id), error_reply(error))
            return
        asker = Asker(client, request_id)
        try:
            reply = self._handle(asker, verb, arguments)
        except Exception as error:  # a bug: refuse this request, keep serving
            log.exception("request %r of client %d failed", verb, client.pid)
            reply = error_fields(ProtoBaseError, f"the coordinator could not process the {verb!r} request "
                                                 f"({type(error).__name__}: {error}); nothing was committed. "
                                                 f"Please report this bug")
        if reply is not None:
            self._answer(asker, reply)

    def _answer(self, asker: Asker | None, reply: list | None) -> None:
        if asker is None or reply is None or asker.client.sock not in self.clients:
            return
        try:
            send(asker.client.sock, [asker.request_id, *reply])
        except OSError:
            self._drop(asker.client.sock)

    def _drop(self, sock: socket.socket) -> None:
        client = self.clients.pop(sock, None)
        if client is None:
            return
        self.buffered_bytes -= client.reader.buffered
        self.selector.unregister(sock)
        sock.close()
        if client.slot is not None and self.control is not None:
            self.control.release_reader(client.slot)
        if not self.clients:
            self.idle_since = time.monotonic()

    # -- requests -----------------------------------------------------------------

    def _handle(self, asker: Asker, verb: str, arguments: list) -> list | None:
        """The reply to one well-formed request; None when it is answered later."""
        try:
            if verb == "commit":
                return self.commit(asker, *arguments)
            if verb == "hello":
                return self._hello(asker.client, *arguments)
            if verb == "watch":
                return self._watch(asker.client, *arguments)
            if verb == "stats":
                return ["ok", self.counters()]
            if verb == "compact":
                self.compact()
                return ["ok", self.seq]
            if verb == "checkpoint":
                self._checkpoint()
                return ["ok", self.seq]
            if verb == "backup":
                self._backup(asker, *arguments)
                return None  # answered once the backup is on disk
            raise AssertionError(f"parse_request let the unknown verb {verb!r} through")
        except DurabilityFailed as error:
            self._fail(str(error))
            return self._failure_reply()
        except ProtoBaseError as error:
            return error_reply(error)

    def _hello(self, client: Client, version: int) -> list:
        if version != FORMAT_VERSION:
            return _version_mismatch(version)
        if client.slot is None:
            client.slot = self.control.assign_reader(client.pid, process_start_time(client.pid))
        return ["ok", self.instance_id, client.slot]

    def _watch(self, client: Client, version: int, prefixes: list) -> list:
        if version != FORMAT_VERSION:
            return _version_mismatch(version)
        if not all(type(prefix) is list for prefix in prefixes):
            raise ProtocolError("malformed request: watch prefixes are lists of keys")
        client.watching = [tuple(prefix) for prefix in prefixes]
        return ["ok", self.published_seq]

    def commit(self, asker: Asker, base: int, serializable: bool, durability: str, ops_bytes: bytes,
               reads: list) -> list | None:
        """Validate, apply, write, log and publish one transaction; None when the reply waits for fsync."""
        if self.durability.failure:
            return self._failure_reply()
        if durability not in DURABILITY_MODES:
            return error_fields(ProtoBaseError, f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        if type(base) is not int or not 0 <= base <= self.seq:
            raise ProtoBaseError(f"commit refused, nothing was applied: it is based on snapshot seq {base!r}, but "
                                 f"the latest commit is seq {self.seq}; a transaction is based on the seq of the "
                                 f"snapshot it read")
        ops = parse_ops(ops_bytes)
        paths = [tuple(op[1]) for op in ops]
        checked = paths + [tuple(path) for path in reads] if serializable else paths
        conflict = self.versions.first_conflict(base, checked)
        if conflict is not None:
            self.conflicts += 1
            path, seq = conflict
            return ["conflict", list(path), base, seq]
        root: Any = self.root
        try:
            for (code, _, argument), path in zip(ops, paths):
                root = self.writer.apply(root, code, path, argument)
            new_root = self.writer.flush(root)
        except PathError as error:
            return error_fields(PathError, f"commit refused: {error}")
        self.seq += 1
        self.root = new_root
        self.versions.record(self.seq, paths)
        self.commits += 1
        self.changed_since_checkpoint = True
        lsn = self.durability.enqueue(codec.encode([self.seq, ops_bytes]), sync=durability == "sync")
        reply = ["ok", self.seq, self._written_values(ops, paths)]  # while the persistence process writes

        if durability == "sync":
            self.pending.append(Pending(lsn, self.seq, new_root, asker, reply, paths))
            reply = None
        else:
            self._publish(self.seq, new_root)
            self._notify(self.seq, paths)
        self._maybe_compact()
        self._maybe_checkpoint()
        return reply

    def _written_values(self, ops: list, paths: list[tuple]) -> list:
        # Tell the client where each SET value now lives, so it can cache the
        # value it already holds (write-through). Only for values nothing later
        # in the commit changed, and only for values stored as one atom.
        # Walk backwards keeping every prefix of the later paths: one set lookup
        # per op, not a scan of the later ops (which made a 10k-key commit quadratic).
        pointers = []
        later: set[tuple] = set()  # {prefix of a path written later in this commit}
        for index in range(len(ops) - 1, -1, -1):
            code, _, argument = ops[index]
            path = paths[index]
            changed_later = path in later
            later.update(path[:end] for end in range(1, len(path) + 1))
            if changed_later or code != OP_SET or not isinstance(argument, (dict, list, set, tuple)):
                continue
            ptr = self.writer.flat_pointer(argument)
            if ptr:
                pointers.append([index, ptr])
        pointers.reverse()
        return pointers

    def _publish(self, seq: int, root: int) -> None:
        if seq > self.published_seq or seq == 0:
            self.published_seq = seq
            self.control.publish_root(seq, root)

    def _publish_when_durable(self, seq: int, root: int) -> None:
        lsn = self.durability.next_lsn - 1
        if lsn <= self.durability.durable_lsn and not self.pending:
            self._publish(seq, root)
        else:
            self.pending.append(Pending(lsn, seq, root, None, None))

    def _notify(self, seq: int, paths: list[tuple]) -> None:
        """Tell every watcher whose prefixes a published commit touched."""
        for client in list(self.clients.values()):
            if client.watching is None or not paths:
                continue
            touched = [list(path) for path in paths
                       if any(path[:len(prefix)] == prefix or prefix[:len(path)] == path for prefix in client.watching)]
            if touched:
                self._answer(Asker(client, PUSH), ["changed", seq, touched])

    def _on_new_segment(self, next_index: int) -> None:
        if self.control is not None:
            self.control.next_segment = next_index

    # -- durability -------------------------------------------------------------------

    def _on_persistence_report(self) -> None:
        for message in self.durability.read_reports():
            if message[0] == "checkpointed" and self.checkpoint_requests:
                seq, asker = self.checkpoint_requests.popleft()
                if asker is None:
                    self.checkpoints += 1
                else:
                    self._answer(asker, ["ok", seq, message[2]])
        self._answer_durable()
        if self.durability.failure:
            self._fail(self.durability.failure)
        if self.durability.sock is None:  # the child is gone: restart it or fail
            self._check_persistence()
        self._watch_persistence()

    def _answer_durable(self) -> None:
        """Publish and acknowledge the waiting commits the durable LSN now covers."""
        durable = self.durability.durable_lsn  # (the persistence process publishes it in the control block)
        newest = None
        answered = []
        while self.pending and self.pending[0].lsn <= durable:
            newest = self.pending.popleft()
            answered.append(newest)
        if newest is not None:
            self._publish(newest.seq, newest.root)
        for pending in answered:
            self._notify(pending.seq, pending.paths)
            self._answer(pending.asker, pending.reply)

    def _check_persistence(self) -> None:
        try:
            self.durability.check_child()
        except DurabilityFailed as error:
            self._fail(str(error))
        self._watch_persistence()

    def _watch_persistence(self) -> None:
        """Keep the selector on the current persistence socket (it changes when the child restarts)."""
        current = self.durability.sock
        if current is self.watched_persistence:
            return
        if self.watched_persistence is not None:
            self.selector.unregister(self.watched_persistence)
        if current is not None:
            self.selector.register(current, selectors.EVENT_READ)
        self.watched_persistence = current

    def _failure_reply(self) -> list:
        return error_fields(
            CoordinatorError,
            f"{self.durability.failure}. This commit was NOT made durable and is not committed, nor is any "
            f"later one. Fix the disk (free space, check the device), close every handle on "
            f"{self.datadir.path} (its coordinator stops once the last one is closed), then open it again: "
            f"recovery restores every commit whose WAL record reached the disk, which includes every "
            f"\"sync\" commit that returned (\"async\" commits of the last flush interval may be lost)",
        )

    def _fail(self, why: str) -> None:
        """Stop acknowledging: answer every waiting commit with the failure, and refuse all later ones.

        The coordinator serves on, so that every commit gets the failure as its
        answer rather than a lost connection, until its last client has gone
        (`_housekeeping`); readers keep their snapshots meanwhile.
        """
        if self.durability.failure is None:
            self.durability.failure = why
        if not self.refusing_commits:
            log.error("durability failed: %s; refusing commits, stopping once the last client has gone", why)
            self.refusing_commits = True
        self._answer_durable()  # those the WAL holds did commit: only the others failed
        while self.pending:
            pending = self.pending.popleft()
            self._answer(pending.asker, self._failure_reply())

    def _maybe_checkpoint(self) -> None:
        if self.durability.wal_bytes >= self.checkpoint_bytes and not self._checkpoint_pending():
            self._checkpoint()

    def _checkpoint_pending(self) -> bool:
        return any(asker is None for _, asker in self.checkpoint_requests)

    def _checkpoint(self, asker: Asker | None = None, directory: str | None = None) -> None:
        """Have the persistence process write the state after the last commit as a checkpoint.

        With `directory`, it is a backup: the checkpoint goes there, the WAL is
        left alone, and `asker` is answered once it is on disk.
        """
        if directory is None and self._checkpoint_pending():
            return
        segments = self.arena.generation()
        assert not self.root or segment_of(self.root) >= self.arena.generation_start, \
            f"root {self.root:#x} lies outside the generation {segments} a checkpoint copies"
        self.checkpoint_requests.append((self.seq, asker))
        if directory is None:
            self.changed_since_checkpoint = False
        self.durability.request_checkpoint(seq=self.seq, root=self.root, segments=segments,
                                           next_segment=self.arena.next_index, directory=directory)

    def _backup(self, asker: Asker, destination: str) -> None:
        """Start a hot, consistent backup of the latest commit into a new data directory."""
        target = DataDir.open(destination)
        if any(name != STAMP for name in os.listdir(target.path)):
            raise DataDirectoryError(f"backup destination {target.path} is not empty; pass a new directory")
        if self.durability.failure:
            raise CoordinatorError(self._failure_reply()[2])
        self._checkpoint(asker, target.path)

    # -- reclamation ----------------------------------------------------------------

    def _maybe_compact(self) -> None:
        """Compact once the garbage outweighs the live data. Never fails the commit that called it.

        Not while the previous compaction's segments still wait for a reader to
        let go: another copy could not free them either, it would only add one
        more generation for that reader to pin (a stopped reader made memory
        grow with every compaction). After a failed compaction, wait for as
        many bytes again before the next attempt.
        """
        threshold = max(self.live_after_compaction, self.compact_min_bytes)
        allocated = self.arena.allocated_bytes
        if allocated - self.allocated_at_compaction <= threshold or allocated < self.next_compaction_attempt \
                or self.retired:
            return
        try:
            self.compact()
        except Exception as error:  # the commit is applied and queued: its client gets "ok", whatever happens here
            self.next_compaction_attempt = allocated + threshold
            log.error("compaction failed and was undone; serving the uncompacted data, next attempt after %d more "
                      "bytes: %s", threshold, error, exc_info=not isinstance(error, ProtoBaseError))

    def compact(self) -> None:
        """Copy the live data into fresh segments and publish it; old segments go once unpinned.

        All or nothing: if the copy fails (/dev/shm full, or any error), its
        segments are unlinked and the root, the generation and the retired
        segments stay as they were; the error is raised, as ProtoBaseError
        saying so when it is one.
        """
        started = time.monotonic()
        before = self.arena.allocated_bytes
        first_new = self.arena.start_generation(self.live_bytes() + self.live_bytes() // 16)
        try:
            root = self.writer.copy_root(self.root)
        except BaseException as error:
            self.compaction_failures += 1
            self.arena.abandon_generation()
            self.writer.store.clear()  # it caches nodes of the abandoned copy
            if isinstance(error, ProtoBaseError):
                raise ProtoBaseError(f"compaction failed and was undone, the database is unchanged: {error}") \
                    from error
            raise
        self.root = root
        self.seq += 1
        self._publish_when_durable(self.seq, self.root)
        self.live_after_compaction = self.arena.allocated_bytes - before
        self.allocated_at_compaction = self.arena.allocated_bytes
        self.discarded_at_compaction = self.writer.discarded_bytes
        self.retired.append((self.seq, first_new))
        self.writer.store.clear()
        self.compactions += 1
        log.info("compaction %d copied %d live bytes in %.3fs", self.compactions,
                 self.live_after_compaction, time.monotonic() - started)
        self._release_retired()

    def _release_retired(self) -> None:
        if not self.retired:
            return
        oldest = self.control.oldest_snapshot()
        for pin, _ in self.checkpoint_requests:
            oldest = pin if oldest is None else min(oldest, pin)
        while self.retired:
            seq, first_live = self.retired[0]
            if self.published_seq < seq or (oldest is not None and oldest < seq):
                return
            self.retired.pop(0)
            self.writer.store.reader.forget_below(first_live)
            self.arena.release_below(first_live)
            self.control.oldest_segment = first_live

    def _housekeeping(self) -> None:
        self._resume_accepting()
        self.control.reap_dead_readers()
        self._drop_stalled_senders()
        self._observe_pins()
        self._check_persistence()
        if self.refusing_commits and not self.clients:
            self.running = False  # whatever the grace: only a restart recovers from the WAL
        self._release_retired()
        if len(self.versions) > 100_000:
            oldest = self.control.oldest_snapshot()
            self.versions.prune(self.published_seq if oldest is None else oldest)
        if self.grace is not None and self.idle_since is not None and not self.pending:
            # Before the first client, linger longer: the launcher that started us may be slow
            # to connect (a loaded host), and must not find us gone.
            linger = self.grace if self.accepted else max(self.grace, FIRST_CLIENT_WAIT)
            if time.monotonic() - self.idle_since >= linger:
                self.running = False

    def _drop_stalled_senders(self) -> None:
        """Hang up on clients that left a request half-sent for too long: they hold our memory."""
        now = time.monotonic()
        for client in list(self.clients.values()):
            if client.reader.buffered and now - client.partial_since > PARTIAL_FRAME_TIMEOUT:
                log.warning("closing the connection of client %d: it left %d bytes of a request unfinished "
                            "for %ss", client.pid, client.reader.buffered, PARTIAL_FRAME_TIMEOUT)
                self._drop(client.sock)

    def _observe_pins(self) -> None:
        """Note when each reader was first seen holding its current snapshot (to within a TICK)."""
        now = time.monotonic()
        seen = {}
        for reader in self.control.readers():
            if reader.snapshot_seq is None:
                continue
            before = self.pins_seen.get(reader.slot)
            unchanged = before is not None and before[:2] == (reader.pid, reader.snapshot_seq)
            seen[reader.slot] = before if unchanged else (reader.pid, reader.snapshot_seq, now)
        self.pins_seen = seen

    def oldest_reader(self) -> OldestReaderCounters | None:
        """The reader holding the oldest snapshot: slot, pid, seq, seconds held, retired bytes it keeps alive.

        What pins memory when a reader stops (SIGSTOP, a debugger, a hung
        worker): it is alive, so it is not reaped, and every segment retired
        after its snapshot waits for it. None when no reader holds a snapshot.
        """
        self._observe_pins()
        if not self.pins_seen:
            return None
        slot, (pid, seq, since) = min(self.pins_seen.items(), key=lambda item: item[1][1])
        kept_below = max((first_live for retired_seq, first_live in self.retired if retired_seq > seq), default=0)
        return {"slot": slot, "pid": pid, "snapshot_seq": seq, "held_seconds": time.monotonic() - since,
                "retained_bytes": self.arena.bytes_below(kept_below)}

    def live_bytes(self) -> int:
        """Estimated bytes reachable from the root (exact right after a compaction)."""
        appended = self.arena.allocated_bytes - self.allocated_at_compaction
        discarded = self.writer.discarded_bytes - self.discarded_at_compaction
        return self.live_after_compaction + appended - discarded

    def counters(self) -> Counters:
        return {
            "seq": self.seq, "published_seq": self.published_seq, "commits": self.commits,
            "conflicts": self.conflicts, "compactions": self.compactions, "checkpoints": self.checkpoints,
            "compaction_failures": self.compaction_failures, "oldest_reader": self.oldest_reader(),
            "allocated_bytes": self.arena.allocated_bytes, "live_bytes": self.live_bytes(),
            "mapped_bytes": self.arena.mapped_bytes(), "segments": len(self.arena.segments),
            "clients": len(self.clients), "pid": os.getpid(), "persistence_pid": self.durability.pid,
            "durable_lsn": self.durability.durable_lsn, "last_lsn": self.durability.next_lsn - 1,
            "wal_bytes_since_checkpoint": self.durability.wal_bytes, "wal_syncs": self.durability.syncs,
            "recovered_records": self.recovered.replayed if self.recovered else 0,
        }


def _version_mismatch(version: int) -> list:
    return error_fields(ProtoBaseError,
                        f"client speaks format {version}, coordinator {FORMAT_VERSION}; upgrade both together")


def _spare_descriptor() -> int | None:
    """A descriptor to give back when out of them (`_refuse_for_lack_of_descriptors`); None if none is left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
