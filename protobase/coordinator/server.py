"""The coordinator: the one process that writes a database's shared memory, and its event loop.

Owns the instance: its control segment, its data segments, the socket, and
the life of the process from start to stop. One runs per data directory,
guarded by an flock on `coordinator.lock`. It serves clients over the Unix
socket in a single-threaded event loop, which is what serialises commits
(it busy polls for a short, learnt while before it sleeps, wire/busypoll.py):
`Coordinator` accepts connections, reads their frames and dispatches each
request to the part that handles it. The commits read in one pass of the
loop (from every ready socket) are committed as one group at its end, and
before any other request, so replies keep the order of the requests:

    clients.py       the connected clients: frames, memory bounds, replies, watchers
    commits.py       validating, applying and publishing commits (writer.py, conflicts.py)
    checkpoints.py   checkpoint and backup requests to the persistence process
    reclamation.py   compaction (at once, or in steps between passes) and the unlinking of retired segments
    durability.py    the commit ring and the persistence process (its reports come in here)
    recovery.py      the state rebuilt from checkpoint and WAL at start-up

Durability: a "sync" commit is acknowledged, and its root published, only once
its WAL record is fsynced, so no snapshot ever shows a commit that a crash
could take back; concurrent sync commits share one fsync. An "async" commit
is published and acknowledged at once; the persistence process fsyncs it
within `flush_interval`. On start, the state is recovered from the newest
checkpoint and the WAL (recovery.py); on a clean stop a final checkpoint is
written, so the next start replays nothing.

Readers that die (kill -9) are dropped when their socket closes, and their
reader slots are reaped by pid and start time at each housekeeping pass
(every `tick`). Running out of file descriptors refuses connections (with an
error reply when a spare descriptor allows it) and never stops the
coordinator.

Every tunable comes from one `Settings` (protobase/settings.py). The cyclic
GC follows protobase/collector.py, installed once recovery is done: what it
built is frozen, and so is whatever survives a young collection later, so no
collection visits the whole heap; its pauses are in the counters.

Invariants: only this process creates, writes or unlinks the instance's
segments; published roots only ever point into live segments; after `stop`
nothing of the instance is left in /dev/shm.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from protobase.collector import Collector
from protobase.coordinator.checkpoints import Checkpoints
from protobase.coordinator.clients import Asker, Client, Connections
from protobase.coordinator.commits import Commits, GroupFailed, Reply, Request
from protobase.coordinator.durability import Durability, DurabilityFailed
from protobase.coordinator.reclamation import Reclamation
from protobase.coordinator.recovery import Recovered, recover
from protobase.coordinator.writer import Writer
from protobase.core.arena import ArenaWriter, AtomReader
from protobase.core.datadir import FORMAT_VERSION, DataDir, FileLock
from protobase.core.store import Store
from protobase.errors import CoordinatorError, ProtoBaseError, ProtocolError
from protobase.settings import DEFAULTS, Settings
from protobase.shm import names
from protobase.shm.control import ControlBlock, process_start_time
from protobase.wire.busypoll import BusyPoll
from protobase.wire.counters import Counters
from protobase.wire.error_table import error_fields, error_reply
from protobase.wire.framing import Body, peer_credentials, send
from protobase.wire.verbs import PUSH, MalformedRequest, parse_request

__all__ = ["Coordinator"]

log = logging.getLogger("protobase.coordinator")

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # accept errors that refuse


class Coordinator:
    """Serves one data directory until the last client has gone (or forever)."""

    def __init__(self, datadir: DataDir, settings: Settings = DEFAULTS) -> None:
        """A coordinator for `datadir`, tuned by `settings`; `start()` it, then `serve_forever()`."""
        self.datadir = datadir
        self.settings = settings
        self.lock = FileLock(datadir.file("coordinator.lock"))
        self.instance_id = names.new_instance_id()
        self.selector = selectors.DefaultSelector()  # the loop's: listener, clients, persistence socket
        self.busy_poll = BusyPoll(settings.busy_poll)  # takes a request that comes soon without a wake-up
        self.connections = Connections(
            self.selector,
            self._release_reader,
            max_buffered_bytes=self.settings.max_buffered_bytes,
            partial_frame_timeout=self.settings.partial_frame_timeout,
        )
        self.listener: socket.socket | None = None  # None before start and after stop
        # One reused buffer for every recv: a fresh 1 MiB bytes per recv costs mmap, mremap and munmap.
        self.receive_buffer = bytearray(self.settings.receive_bytes)
        self.receive_view = memoryview(self.receive_buffer)
        self.watched_persistence: socket.socket | None = None  # the persistence socket in the selector
        # Set by start(), and kept after stop() (whose shared memory is then gone):
        self.control: ControlBlock  # the instance's control segment: root seqlock, reader table
        self.arena: ArenaWriter  # the instance's data segments
        self.writer: Writer  # applies commits, recovery's replay and compactions
        self.recovered: Recovered  # what start-up recovery rebuilt
        self.durability: Durability  # the commit ring and the persistence process
        self.commits: Commits  # the latest commit, the published root, commits waiting for fsync
        self.checkpoints: Checkpoints  # checkpoint and backup requests in flight
        self.reclamation: Reclamation  # compactions and retired segments
        self.started = False  # True from a successful start() to stop()
        self.housekept_at = 0.0  # time.monotonic() of the last housekeeping pass
        # A descriptor held in reserve: out of them, closing it lets us accept a connection just to refuse it.
        self.spare_fd: int | None = None
        self.accept_paused = False  # True while the listener is out of the selector (out of descriptors)
        self.short_of_descriptors = False  # True from a failed accept to the next successful one
        self.running = False
        self.queued_commits: list[Request] = []  # read in this pass of the loop, committed as one group at its end
        self.collector = Collector()  # the GC policy of this process, installed once recovery is done

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Take the directory, sweep a crashed instance, recover, start persistence, listen."""
        self._acquire(self.lock, "another coordinator serves it")
        control: ControlBlock | None = None
        arena: ArenaWriter | None = None
        try:
            self._sweep_previous_instance()
            pid = os.getpid()
            control = ControlBlock.create(
                names.control_name(self.instance_id),
                reader_slots=self.settings.reader_slots,
                coordinator_pid=pid,
                coordinator_start=process_start_time(pid),
            )
            self.datadir.write_instance(self.instance_id)
            arena = ArenaWriter(self.instance_id, _segment_counter(control))
            self._recover(control, arena)
            self._listen()
        except BaseException:
            _release_shared_memory(self.instance_id, control, arena)
            self.lock.release()
            raise
        self.collector.install()  # what start-up and recovery built lives on: frozen, never visited again
        self.started = self.running = True
        log.info("coordinator %d serving %s (instance %s)", os.getpid(), self.datadir.path, self.instance_id)

    def _acquire(self, lock: FileLock, holder: str) -> None:
        wait = self.settings.lock_wait
        deadline = time.monotonic() + wait
        while not lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise CoordinatorError(f"{lock.path} is still held after {wait}s: {holder}")
            time.sleep(0.02)

    def _recover(self, control: ControlBlock, arena: ArenaWriter) -> None:
        """Rebuild the state, publish it, start the persistence process; build the parts that serve."""
        self.control, self.arena = control, arena
        settings = self.settings
        store = Store(
            AtomReader(self.instance_id, writer=arena),
            object_cache=settings.object_cache,
            bytes_cache=settings.bytes_cache,
        )
        self.writer = Writer(arena, store, settings)
        wal_lock = FileLock(self.datadir.file("wal.lock"))
        self._acquire(wal_lock, "a persistence process still writes the WAL")
        try:
            self.recovered = recover(self.datadir.path, arena, self.writer)
        finally:
            wal_lock.release()
        self.durability = Durability(
            self.datadir,
            self.instance_id,
            control,
            next_lsn=self.recovered.lsn + 1,
            flush_interval=settings.flush_interval,
            busy_poll=settings.busy_poll,
        )
        self.commits = Commits(
            self.writer,
            control,
            self.durability,
            self.connections,
            seq=self.recovered.seq,
            root=self.recovered.root,
            directory=self.datadir.path,
            on_applied=self._after_commit,
        )
        self.commits.publish(self.recovered.seq, self.recovered.root)
        self.checkpoints = Checkpoints(
            self.durability,
            arena,
            self.commits,
            self.connections,
            checkpoint_bytes=settings.checkpoint_bytes,
            changed=self.recovered.replayed > 0,
        )
        self.reclamation = Reclamation(
            arena,
            self.writer,
            control,
            self.commits,
            self.checkpoints,
            compact_min_bytes=settings.compact_min_bytes,
            compact_in_steps_above=settings.compact_in_steps_above,
        )
        self.durability.start()
        try:
            self.durability.wait_started()
        except DurabilityFailed as error:
            self.durability.stop()
            raise CoordinatorError(f"cannot write the write-ahead log of {self.datadir.path}: {error}") from None
        self._watch_persistence()

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
        tick = self.settings.tick
        try:
            while self.running:
                step_due = self.reclamation.due_in()  # a compaction in steps goes on while no commit comes
                for key, _ in self._events(tick if step_due is None else min(tick, step_due)):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self.watched_persistence:
                        self._on_persistence_report()
                    elif key.fileobj in self.connections.clients:
                        self._read(key.fileobj)
                self._commit_queued()
                self.reclamation.advance()
                now = time.monotonic()
                if now - self.housekept_at >= tick:  # not on every wake-up: it scans the reader table
                    self.housekept_at = now
                    self._housekeeping()
        except Exception:
            log.exception("the coordinator's event loop failed; stopping")
            raise
        finally:
            self.stop()

    def _events(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        """What is ready: found by a busy poll, else after a sleep of up to `timeout` seconds."""
        select = self.selector.select
        return self.busy_poll.wait(lambda: select(0), lambda: select(timeout), within=timeout)

    def _request_stop(self) -> None:
        self.running = False

    def stop(self) -> None:
        """Checkpoint, stop persistence, close every connection, remove the instance from /dev/shm."""
        self.running = False
        if not self.started:
            return
        self.started = False
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
        self.connections.drop_all()
        self.durability.stop()
        _release_shared_memory(self.instance_id, self.control, self.arena)
        self.datadir.write_instance(None)
        self.lock.release()
        log.info("coordinator %d stopped", os.getpid())

    def _final_checkpoint(self) -> None:
        """On a clean stop: checkpoint, and wait until it and every pending commit are durable."""
        if self.durability.failure:
            return
        if self.checkpoints.changed_since_checkpoint or self.commits.pending:
            self.checkpoints.request()
        timeout = self.settings.stop_timeout
        deadline = time.monotonic() + timeout
        while (self.commits.pending or self.checkpoints.requests) and not self.durability.failure:
            if time.monotonic() > deadline:
                log.error("the final checkpoint did not finish in %ss; the WAL still holds every commit", timeout)
                return
            if self.durability.sock is not None:
                select.select([self.durability.sock], [], [], self.settings.tick)
            self._on_persistence_report()

    # -- connections --------------------------------------------------------------

    def _accept(self) -> None:
        """Take one connection; out of descriptors (or any accept error), refuse it and keep serving."""
        assert self.listener is not None
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
        self.connections.add(sock, pid)

    def _refuse_for_lack_of_descriptors(self, error: OSError) -> None:
        """Accept with the spare descriptor just to answer and close; else stop accepting for one tick.

        The refused connection stays in the listen backlog and keeps the
        listener readable: without taking it off, the loop would spin.
        """
        assert self.listener is not None
        refused = None
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                refused, _ = self.listener.accept()
            except OSError:
                refused = None
        if refused is not None:
            message = (
                f"the coordinator of {self.datadir.path} (pid {os.getpid()}) is out of file descriptors "
                f"({error.strerror}) and refused this connection; close idle database handles, or raise "
                f"its limit (ulimit -n, LimitNOFILE= for systemd), then open the database again"
            )
            try:
                refused.setblocking(False)
                send(refused, [PUSH, *error_fields(CoordinatorError, message)])
            except OSError:
                pass  # it is refused either way
            refused.close()
            log.error(
                "refused a connection: out of file descriptors (%s); still serving %d clients",
                error.strerror,
                len(self.connections),
            )
        else:
            self.selector.unregister(self.listener)
            self.accept_paused = True
            if not self.short_of_descriptors:  # once, not on every retry
                log.error(
                    "out of file descriptors (%s), even with the spare one closed: new connections wait "
                    "until some are free; still serving %d clients",
                    error.strerror,
                    len(self.connections),
                )
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
        client = self.connections.clients[sock]
        try:
            try:
                received = sock.recv_into(self.receive_buffer)
            except BlockingIOError:
                return
            if not received:
                raise ConnectionResetError
            bodies = self.connections.take_frames(client, self.receive_view[:received])
        except (OSError, CoordinatorError):
            self.connections.drop(sock)
            return
        except ProtocolError as error:  # a frame we cannot skip, or a client over its memory bound
            log.warning("closing the connection of client %d: %s", client.pid, error)
            self.connections.answer(Asker(client, PUSH), error_reply(error))
            self.connections.drop(sock)
            return
        for body in bodies:
            self._serve(client, body)

    def _release_reader(self, slot: int) -> None:
        self.control.release_reader(slot)

    # -- requests -----------------------------------------------------------------

    def _serve(self, client: Client, body: Body) -> None:
        """Parse and handle one request, and answer it (now, or later for what waits on the disk)."""
        try:
            request_id, verb, arguments = parse_request(body)
        except MalformedRequest as error:
            log.warning("client %d: %s", client.pid, error)
            self.connections.answer(Asker(client, error.request_id), error_reply(error))
            return
        asker = Asker(client, request_id)
        if verb == "commit":
            self._queue_commit(asker, arguments)
            return
        self._commit_queued()  # the commits that came before this request are answered before it
        try:
            reply = self._handle(asker, verb, arguments)
        except Exception as error:  # a bug: refuse this request, keep serving
            reply = _bug_reply(asker, verb, error)
        if reply is not None:
            self.connections.answer(asker, reply)

    def _queue_commit(self, asker: Asker, arguments: list[Any]) -> None:
        """Hold a commit until the loop has read every socket that is ready: they are applied as one group.

        A group holds commits of one durability mode (see `Commits.commit_group`).
        """
        if self.queued_commits and self.queued_commits[0][1][2] != arguments[2]:
            self._commit_queued()
        self.queued_commits.append((asker, arguments))

    def _commit_queued(self) -> None:
        """Commit the queued commits as one group and answer them, in order."""
        if not self.queued_commits:
            return
        group, self.queued_commits = self.queued_commits, []
        try:
            replies = self.commits.commit_group(group)
        except GroupFailed as failure:  # a bug: find the commit it is in by committing them one by one
            if len(group) == 1:
                replies = [_bug_reply(group[0][0], "commit", failure.__cause__ or failure)]
            else:
                log.warning("a group of %d commits failed (%s); committing them one by one", len(group), failure)
                for request in group:
                    self.queued_commits = [request]
                    self._commit_queued()
                return
        for (asker, _), reply in zip(group, replies):
            if reply is not None:
                self.connections.answer(asker, reply)

    def _handle(self, asker: Asker, verb: str, arguments: list[Any]) -> Reply | None:
        """The reply to one well-formed request; None when it is answered later."""
        try:
            if verb == "hello":
                return self._hello(asker.client, *arguments)
            if verb == "watch":
                return self._watch(asker.client, *arguments)
            if verb == "stats":
                return ["ok", self.counters()]
            if verb == "compact":
                self.reclamation.compact()
                return ["ok", self.commits.seq]
            if verb == "checkpoint":
                self.checkpoints.request()
                return ["ok", self.commits.seq]
            if verb == "backup":
                self.checkpoints.backup(asker, *arguments)
                return None  # answered once the backup is on disk
            raise AssertionError(f"parse_request let the unknown verb {verb!r} through")
        except DurabilityFailed as error:
            self.commits.fail(str(error))
            return self.commits.failure_reply()
        except ProtoBaseError as error:
            return error_reply(error)

    def _after_commit(self) -> None:
        """What a commit that was applied may set off: a compaction, a checkpoint."""
        self.checkpoints.note_commit()
        self.reclamation.maybe_compact()
        self.checkpoints.maybe_checkpoint()

    def _hello(self, client: Client, version: int) -> Reply:
        if version != FORMAT_VERSION:
            return _version_mismatch(version)
        if client.slot is None:
            client.slot = self.control.assign_reader(client.pid, process_start_time(client.pid))
        return ["ok", self.instance_id, client.slot]

    def _watch(self, client: Client, version: int, prefixes: list[Any]) -> Reply:
        if version != FORMAT_VERSION:
            return _version_mismatch(version)
        if not all(type(prefix) is list for prefix in prefixes):
            raise ProtocolError("malformed request: watch prefixes are lists of keys")
        client.watching = [tuple(prefix) for prefix in prefixes]
        return ["ok", self.commits.published_seq]

    # -- the persistence process ----------------------------------------------------

    def _on_persistence_report(self) -> None:
        for message in self.durability.read_reports():
            if message[0] == "checkpointed":
                self.checkpoints.on_checkpointed(message[3], message[2])
        self.commits.answer_durable()
        if self.durability.failure:
            self.commits.fail(self.durability.failure)
        if self.durability.sock is None:  # the child is gone: restart it or fail
            self._check_persistence()
        self._watch_persistence()

    def _check_persistence(self) -> None:
        try:
            self.durability.check_child()
        except DurabilityFailed as error:
            self.commits.fail(str(error))
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

    # -- housekeeping ---------------------------------------------------------------

    def _housekeeping(self) -> None:
        self._resume_accepting()
        self.control.reap_dead_readers()
        self.connections.drop_stalled_senders()
        self.reclamation.observe_pins()
        self._check_persistence()
        if self.commits.refusing and not self.connections.clients:
            self.running = False  # whatever the grace: only a restart recovers from the WAL
        self.reclamation.release_retired()
        self.commits.prune_versions()
        grace = self.settings.shutdown_grace
        if grace is not None and self.connections.idle_since is not None and not self.commits.pending:
            # Before the first client, linger longer: the launcher that started us may be slow
            # to connect (a loaded host), and must not find us gone.
            linger = grace if self.connections.accepted else max(grace, self.settings.first_client_wait)
            if time.monotonic() - self.connections.idle_since >= linger:
                self.running = False

    def counters(self) -> Counters:
        """One consistent reading of the coordinator's state: the reply to "stats"."""
        return {
            "seq": self.commits.seq,
            "published_seq": self.commits.published_seq,
            "commits": self.commits.commits,
            "commit_groups": self.commits.groups,
            "conflicts": self.commits.conflicts,
            "compactions": self.reclamation.compactions,
            "checkpoints": self.checkpoints.checkpoints,
            "compaction_failures": self.reclamation.compaction_failures,
            "oldest_reader": self.reclamation.oldest_reader(),
            "allocated_bytes": self.arena.allocated_bytes,
            "live_bytes": self.reclamation.live_bytes(),
            "mapped_bytes": self.arena.mapped_bytes(),
            "segments": len(self.arena.segments),
            "clients": len(self.connections),
            "pid": os.getpid(),
            "persistence_pid": self.durability.pid,
            "durable_lsn": self.durability.durable_lsn,
            "last_lsn": self.durability.next_lsn - 1,
            "wal_bytes_since_checkpoint": self.durability.wal_bytes,
            "wal_syncs": self.durability.syncs,
            "recovered_records": self.recovered.replayed,
            "gc_pauses": self.collector.recorder.pauses,
            "gc_longest_pause_ms": self.collector.recorder.longest_ms,
            "gc_pause_total_ms": self.collector.recorder.total_ms,
            "gc_freezes": self.collector.freezes,  # (never gc.get_freeze_count(): it walks the frozen heap)
        }


def _segment_counter(control: ControlBlock) -> Callable[[int], None]:
    """The arena's new-segment callback: publish the next segment index in the control block."""

    def on_new_segment(next_index: int) -> None:
        control.next_segment = next_index

    return on_new_segment


def _release_shared_memory(instance_id: str, control: ControlBlock | None, arena: ArenaWriter | None) -> None:
    """Unlink every segment of the instance: those we hold, and by name whatever else it left."""
    if arena is not None:
        arena.close(unlink=True)
    if control is not None:
        control.unlink()
        control.close()
    names.sweep(instance_id)


def _bug_reply(asker: Asker, verb: str, error: BaseException) -> Reply:
    """The reply to a request that failed for a reason no refusal names: a bug; logged, and nothing committed."""
    log.error("request %r of client %d failed", verb, asker.client.pid, exc_info=error)
    return error_fields(
        ProtoBaseError,
        f"the coordinator could not process the {verb!r} request ({type(error).__name__}: {error}); "
        f"nothing was committed. Please report this bug",
    )


def _version_mismatch(version: int) -> Reply:
    return error_fields(
        ProtoBaseError, f"client speaks format {version}, coordinator {FORMAT_VERSION}; upgrade both together"
    )


def _spare_descriptor() -> int | None:
    """A descriptor to give back when out of them (`_refuse_for_lack_of_descriptors`); None if none is left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
