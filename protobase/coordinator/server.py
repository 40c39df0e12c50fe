"""The coordinator: the one process that writes a database's shared memory.

Owns the instance: its control segment, its data segments, the socket, the
published root and the version table. One runs per data directory, guarded by
an flock on `coordinator.lock`. It serves clients over the Unix socket in a
single-threaded event loop, which is what serialises commits: each commit is
validated (conflicts.py), applied by path copying (writer.py), written to
atoms and published through the control segment's seqlock before the reply.

Reclamation is a copying compaction: once the bytes appended since the last
compaction exceed the live bytes then (and `compact_min_bytes`), every atom
reachable from the root is copied into fresh segments and the new root is
published; the old segments are unlinked as soon as no reader's snapshot is
older than that publish. Readers that die (kill -9) are dropped when their
socket closes, and their reader slots are reaped by pid and start time.

Invariants: only this process creates, writes or unlinks the instance's
segments; published roots only ever point into live segments; after `stop`
nothing of the instance is left in /dev/shm.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from typing import Any

from ..arena import ArenaWriter, AtomReader
from ..datadir import FORMAT_VERSION, DataDir, FileLock
from ..errors import CoordinatorError, ProtoBaseError
from ..protocol import FrameReader, peer_credentials, send
from ..shm import names
from ..shm.control import ControlBlock, process_start_time
from ..store import Store
from .conflicts import VersionTable
from .writer import OP_SET, PathError, Writer

__all__ = ["Coordinator", "LOCK_WAIT"]

log = logging.getLogger("protobase.coordinator")

TICK = 0.2  # seconds between housekeeping passes
LOCK_WAIT = 10.0  # seconds a new coordinator waits for a stopping one to let go
DEFAULT_COMPACT_MIN_BYTES = 64 << 20


class Client:
    """One connected client process."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid  # from SO_PEERCRED
        self.reader = FrameReader()
        self.slot: int | None = None  # reader-table slot, once it said hello


class Coordinator:
    """Serves one data directory until the last client has gone (or forever)."""

    def __init__(self, datadir: DataDir, *, grace: float | None = 2.0,
                 compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES) -> None:
        self.datadir = datadir
        self.grace = grace  # seconds to linger with no client; None: serve forever
        self.compact_min_bytes = compact_min_bytes
        self.lock = FileLock(datadir.file("coordinator.lock"))
        self.instance_id = names.new_instance_id()
        self.control: ControlBlock | None = None
        self.arena: ArenaWriter | None = None
        self.writer: Writer | None = None
        self.listener: socket.socket | None = None
        self.selector = selectors.DefaultSelector()
        self.clients: dict[socket.socket, Client] = {}  # {connection -> client}
        self.versions = VersionTable()
        self.seq = 0  # sequence number of the published root
        self.root = 0  # AtomPointer of the published root
        self.live_after_compaction = 0  # bytes copied by the last compaction
        self.allocated_at_compaction = 0  # arena.allocated_bytes right after it
        self.discarded_at_compaction = 0  # writer.discarded_bytes right after it
        self.retired: list[tuple[int, int]] = []  # [(publish seq, first live segment)] awaiting unlink
        self.commits = 0
        self.conflicts = 0
        self.compactions = 0
        self.idle_since: float | None = time.monotonic()
        self.running = False

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Take the directory, sweep a crashed instance, create shared memory, listen."""
        deadline = time.monotonic() + LOCK_WAIT
        while not self.lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise CoordinatorError(
                    f"another coordinator holds {self.lock.path}; it serves {self.datadir.path} already")
            time.sleep(0.05)
        try:
            self._sweep_previous_instance()
            pid = os.getpid()
            self.control = ControlBlock.create(names.control_name(self.instance_id),
                                               coordinator_pid=pid, coordinator_start=process_start_time(pid))
            self.arena = ArenaWriter(self.instance_id, self._on_new_segment)
            self.writer = Writer(self.arena, Store(AtomReader(self.instance_id, writer=self.arena)))
            self.control.publish_root(self.seq, self.root)
            self.datadir.write_instance(self.instance_id)
            self._listen()
        except BaseException:
            self._release_shared_memory()
            self.lock.release()
            raise
        self.running = True
        log.info("coordinator %d serving %s (instance %s)", os.getpid(), self.datadir.path, self.instance_id)

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

    def serve_forever(self) -> None:
        """Run the event loop until stopped, then release everything."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._request_stop())
        try:
            while self.running:
                for key, _ in self.selector.select(TICK):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._read(key.fileobj)
                self._housekeeping()
        finally:
            self.stop()

    def _request_stop(self) -> None:
        self.running = False

    def stop(self) -> None:
        """Close every connection and remove the instance from /dev/shm."""
        self.running = False
        if self.control is not None:
            self.control.shutting_down = True
        for sock in list(self.clients):
            self._drop(sock)
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.datadir.socket_path)
            except FileNotFoundError:
                pass
        self._release_shared_memory()
        self.datadir.write_instance(None)
        self.lock.release()
        log.info("coordinator %d stopped", os.getpid())

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
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        pid, uid, _ = peer_credentials(sock)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (pid %d)", uid, pid)
            sock.close()
            return
        sock.setblocking(True)
        sock.settimeout(10.0)  # a client that stops reading replies cannot stall us forever
        self.clients[sock] = Client(sock, pid)
        self.selector.register(sock, selectors.EVENT_READ)
        self.idle_since = None

    def _read(self, sock: socket.socket) -> None:
        client = self.clients[sock]
        try:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionResetError
            for message in client.reader.feed(data):
                send(sock, self._handle(client, message))
        except (OSError, CoordinatorError):
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        client = self.clients.pop(sock)
        self.selector.unregister(sock)
        sock.close()
        if client.slot is not None and self.control is not None:
            self.control.release_reader(client.slot)
        if not self.clients:
            self.idle_since = time.monotonic()

    # -- requests -----------------------------------------------------------------

    def _handle(self, client: Client, message: list) -> list:
        try:
            verb = message[0]
            if verb == "commit":
                return self.commit(message[1], message[2], message[3], message[4])
            if verb == "hello":
                return self._hello(client, message[1])
            if verb == "stats":
                return ["ok", self.counters()]
            if verb == "compact":
                self.compact()
                return ["ok", self.seq]
            return ["error", "ProtoBaseError", f"unknown request {verb!r}"]
        except ProtoBaseError as error:
            return ["error", type(error).__name__, str(error)]
        except Exception as error:  # a bad request or a bug: refuse this request, keep serving
            log.exception("request %r failed", message[:1])
            return ["error", "ProtoBaseError",
                    f"the coordinator could not process the request ({type(error).__name__}: {error}); "
                    f"nothing was committed. If the request was well formed, please report this bug"]

    def _hello(self, client: Client, version: int) -> list:
        if version != FORMAT_VERSION:
            return ["error", "ProtoBaseError",
                    f"client speaks format {version}, coordinator {FORMAT_VERSION}; upgrade both together"]
        if client.slot is None:
            client.slot = self.control.assign_reader(client.pid, process_start_time(client.pid))
        return ["ok", self.instance_id, client.slot]

    def commit(self, base: int, serializable: bool, ops: list, reads: list) -> list:
        """Validate, apply, write and publish one transaction."""
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
            return ["error", "ProtoBaseError", f"commit refused: {error}"]
        self._publish(new_root)
        self.versions.record(self.seq, paths)
        self.commits += 1
        pointers = self._written_values(ops, paths)
        self._maybe_compact()
        return ["ok", self.seq, pointers]

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

    def _publish(self, root: int) -> None:
        self.seq += 1
        self.root = root
        self.control.publish_root(self.seq, root)

    def _on_new_segment(self, next_index: int) -> None:
        if self.control is not None:
            self.control.next_segment = next_index

    # -- reclamation ----------------------------------------------------------------

    def _maybe_compact(self) -> None:
        garbage_estimate = self.arena.allocated_bytes - self.allocated_at_compaction
        if garbage_estimate > max(self.live_after_compaction, self.compact_min_bytes):
            self.compact()

    def compact(self) -> None:
        """Copy the live data into fresh segments and publish it; old segments go once unpinned."""
        started = time.monotonic()
        before = self.arena.allocated_bytes
        first_new = self.arena.start_generation()
        new_root = self.writer.copy_root(self.root)
        self._publish(new_root)
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
        while self.retired and (oldest is None or oldest >= self.retired[0][0]):
            _, first_live = self.retired.pop(0)
            self.writer.store.reader.forget_below(first_live)
            self.arena.release_below(first_live)
            self.control.oldest_segment = first_live

    def _housekeeping(self) -> None:
        self.control.reap_dead_readers()
        self._release_retired()
        oldest = self.control.oldest_snapshot()
        if len(self.versions) > 100_000:
            self.versions.prune(self.seq if oldest is None else oldest)
        if self.grace is not None and self.idle_since is not None:
            if time.monotonic() - self.idle_since >= self.grace:
                self.running = False

    def live_bytes(self) -> int:
        """Estimated bytes reachable from the root (exact right after a compaction)."""
        appended = self.arena.allocated_bytes - self.allocated_at_compaction
        discarded = self.writer.discarded_bytes - self.discarded_at_compaction
        return self.live_after_compaction + appended - discarded

    def counters(self) -> dict[str, int]:
        return {
            "seq": self.seq, "commits": self.commits, "conflicts": self.conflicts,
            "compactions": self.compactions, "allocated_bytes": self.arena.allocated_bytes,
            "live_bytes": self.live_bytes(), "mapped_bytes": self.arena.mapped_bytes(),
            "segments": len(self.arena.segments), "clients": len(self.clients), "pid": os.getpid(),
        }

