"""The persistence process: drains the commit ring into the WAL, fsyncs in groups.

Owns the consumer side of one instance's commit ring, the WAL writer, the
checkpoint writing, and the durable LSN in the control segment. Runs in its
own process, started and supervised by the coordinator (`python -m
protobase.persistence DIR ...`, the data directory's absolute path on its
command line). It holds `wal.lock` for its whole life, so a new coordinator
never reads a WAL that is still being written.

Invariant: the durable LSN published in the control segment (and reported to
the coordinator) never exceeds what an fsync of the WAL covered, and the WAL
holds the ring's records in LSN order, each once, with no gap and nothing of
another history.

Loop: wait for the doorbell (a byte on the socket shared with the coordinator,
busy polled first: wire/busypoll.py) or `flush_interval`; take every whole
record from the ring; append them to the WAL file with one write; advance
the ring's tail; fsync once for the batch when it holds a "sync" commit (or
when `flush_interval` has passed since unsynced "async" ones were written);
publish the durable LSN in the control segment and tell the coordinator.
That one fsync per batch is group commit.

Start-up: the coordinator passes the first LSN it does not hold durable and
the last LSN it has handed out; the WAL must fit between them (`_open_wal`),
and a ring record is skipped as already written only if the WAL holds that
very record, read back and compared by checksum. A WAL of another history
(a checkpoint deleted after a clean stop leaves it ahead of the state) stops
us with CorruptionError instead of swallowing new commits.

The cyclic GC follows protobase/collector.py (installed once the WAL is open)
when started by `main`, as the coordinator starts it.

Control records in the ring ask for a checkpoint: the WAL is synced first
and a new WAL file started, then the checkpoint is written from the segments
the coordinator keeps pinned, on a thread (checkpointjob.py), while the loop
goes on draining the ring into the new file; once it is written, the files
it covers are removed and the coordinator told. One is written at a time, in
ring order, each report naming its request's id.

Failure: a write or fsync error is never retried (after a failed fsync the
page cache may have dropped the data). The process reports it, raises the
control segment's WAL-failed flag (the coordinator checks it before handing
over each commit, so it stops acknowledging at once), syncs what it wrote
before a failed write, and exits with status 3; a restart recovers from the
WAL. If the coordinator dies, the ring is drained and synced, then we exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import time
import zlib
from typing import Any

from protobase.collector import Collector
from protobase.core import codec
from protobase.core.datadir import DataDir, FileLock
from protobase.errors import CorruptionError, WalSyncError, WalWriteError
from protobase.persistence.checkpoint import checkpoint_files, remove_checkpoints_before
from protobase.persistence.checkpointjob import CheckpointJob
from protobase.persistence.wal.files import fsync_directory, list_wal_files, remove_wal_files_before
from protobase.persistence.wal.reader import read_records
from protobase.persistence.wal.writer import WalWriter
from protobase.shm import names
from protobase.shm.control import ControlBlock, full_fence
from protobase.shm.ring import CONTROL, SYNC, CommitRing
from protobase.wire.busypoll import BusyPoll
from protobase.wire.framing import send

__all__ = ["Persistence", "EXIT_DISK_FAILURE", "main"]

log = logging.getLogger("protobase.persistence")

EXIT_DISK_FAILURE = 3
LOCK_WAIT = 30.0


class Persistence:
    """The consumer of one instance's commit ring."""

    def __init__(
        self,
        datadir: DataDir,
        instance_id: str,
        sock: socket.socket,
        flush_interval: float,
        collector: Collector | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        self.datadir = datadir
        self.instance_id = instance_id
        self.sock = sock  # doorbell in, reports out
        self.flush_interval = flush_interval
        # The socket and the checkpoint thread's pipe, looked at without a wait while busy polling.
        self.doorbell = select.poll()
        self.doorbell.register(sock, select.POLLIN)
        self.job_ended, self._job_ended_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a byte: the thread ended
        self.doorbell.register(self.job_ended, select.POLLIN)
        self.job: CheckpointJob | None = None  # the checkpoint or backup being written
        self.busy_poll = BusyPoll(busy_poll)  # a doorbell that rings soon is heard without a wake-up
        self.lock = FileLock(datadir.file("wal.lock"))
        self._control: ControlBlock | None = None  # attached by run(), once it holds the lock
        self._ring: CommitRing | None = None  # attached by run(), once it holds the lock
        self._writer: WalWriter | None = None  # the WAL file appended to; replaced when a checkpoint rotates it
        self.inherited: dict[int, int] = {}  # {lsn -> crc32 of the payload} of records a predecessor wrote
        self.unsynced_since: float | None = None  # when the oldest unsynced record was written
        self.coordinator_gone = False
        self.collector = collector  # the process's GC policy (main() passes one; tests running us in place none)

    def run(self, next_lsn: int, last_lsn: int) -> int:
        """Serve until the coordinator goes; return the exit status.

        `next_lsn` is the first LSN the coordinator does not hold durable,
        `last_lsn` the last one it has handed out (see `_open_wal`).
        """
        deadline = time.monotonic() + LOCK_WAIT
        while not self.lock.acquire(blocking=False):
            if time.monotonic() > deadline:
                log.error("wal.lock is still held after %ss; another persistence process runs", LOCK_WAIT)
                self._close_pipe()
                return 1
            time.sleep(0.01)
        self._control = ControlBlock.attach(names.control_name(self.instance_id))
        self._ring = CommitRing.attach(names.segment_name(self.instance_id, "ring"))
        try:
            self._writer = self._open_wal(next_lsn, last_lsn)
            # A predecessor killed between write and fsync left records in the page cache
            # only: make them durable before anything else, then say so.
            self.writer.sync()
            self.control.durable_lsn = self.writer.last_lsn
            self._report(["started", self.writer.last_lsn])
            if self.collector is not None:
                self.collector.install()

            while not self.coordinator_gone:
                self._wait()
                self._drain()
                if self.job is not None and self.job.done:
                    self._finish_checkpoint()
            self._drain()  # the coordinator stopped or died: keep what it handed us
            self._sync()
            self._finish_checkpoint()
            return 0
        except (WalWriteError, WalSyncError, OSError, CorruptionError) as error:
            log.error("write-ahead log failed: %s", error)
            # The report first: a coordinator that sees the flag finds the reason already sent.
            self._report(["failed", f"{type(error).__name__}: {error}"])
            self.control.wal_failed = True
            if isinstance(error, WalWriteError):
                self._sync_written()
            return EXIT_DISK_FAILURE
        finally:
            if self.job is not None:
                self.job.thread.join()  # it reads segments and writes a file: not to be cut off by our exit
            self._close_pipe()
            if self._writer is not None:
                self._writer.close()
            self._ring.close()
            self._control.close()
            self.lock.release()

    def _close_pipe(self) -> None:
        os.close(self.job_ended)
        os.close(self._job_ended_w)

    @property
    def control(self) -> ControlBlock:
        """The instance's control segment; attached while `run` serves."""
        assert self._control is not None, "the control segment is used before run() attached it"
        return self._control

    @property
    def ring(self) -> CommitRing:
        """The commit ring this process consumes; attached while `run` serves."""
        assert self._ring is not None, "the commit ring is used before run() attached it"
        return self._ring

    @property
    def writer(self) -> WalWriter:
        """The WAL file records are appended to; open while `run` serves."""
        assert self._writer is not None, "the WAL is written before run() opened it"
        return self._writer

    def _open_wal(self, next_lsn: int, last_lsn: int) -> WalWriter:
        """Open the WAL file to continue, after checking it against the coordinator's LSNs.

        The coordinator holds every LSN < next_lsn durable (recovered from
        disk, or reported fsynced by a predecessor of ours) and has handed out
        LSNs up to last_lsn. The last WAL file may go on past next_lsn - 1
        only with records of a predecessor killed between write and fsync:
        those we read back here and remember by checksum, and we skip their
        copies in the ring only if they match (`_already_written`). Anything
        else is another history, and appending would mix the two: a file
        ending past last_lsn (a checkpoint deleted after a clean stop leaves
        the WAL ahead of the recovered state), a file starting after next_lsn
        (the records between are in no file we read), or one ending before
        next_lsn - 1 with no checkpoint covering the rest.
        """
        files = list_wal_files(self.datadir.path)
        if not files:
            self._check_covered(next_lsn - 1, None)
            return WalWriter.create(self.datadir.path, next_lsn)
        writer = WalWriter.open_for_append(files[-1][1])
        try:
            self._check_continues(writer, next_lsn, last_lsn)
        except BaseException:
            writer.close()
            raise
        if writer.last_lsn < next_lsn - 1:  # a checkpoint must hold the rest: start the file after it
            writer.close()
            self._check_covered(next_lsn - 1, writer)
            return WalWriter.create(self.datadir.path, next_lsn)
        if writer.last_lsn >= next_lsn:
            self.inherited = {lsn: zlib.crc32(data) for lsn, data in read_records(writer.path, next_lsn - 1)}
        return writer

    def _check_continues(self, writer: WalWriter, next_lsn: int, last_lsn: int) -> None:
        """CorruptionError unless the WAL file of `writer` fits the coordinator's LSNs; see `_open_wal`."""
        if writer.last_lsn > last_lsn:
            raise CorruptionError(
                f"WAL file {writer.path} ends at lsn {writer.last_lsn}, past lsn {last_lsn}, the last commit of the "
                f"state being served: the WAL belongs to a later state (was a checkpoint-*.pb file moved or "
                f"deleted?); put the missing file back, or salvage with `protobase recover {self.datadir.path} "
                f"NEW_DIR`"
            )
        if writer.last_lsn >= next_lsn and writer.first_lsn > next_lsn:
            raise CorruptionError(
                f"WAL records {next_lsn}..{writer.first_lsn - 1} are in no WAL file: {writer.path} starts at lsn "
                f"{writer.first_lsn}; the database must stop and recover (`protobase recover`)"
            )

    def _check_covered(self, lsn: int, writer: WalWriter | None) -> None:
        """CorruptionError unless a checkpoint holds the state up to `lsn` (which no WAL file we read holds)."""
        if lsn == 0 or any(covered >= lsn for covered, _ in checkpoint_files(self.datadir.path)):
            return
        where = f"the last WAL file, {writer.path}, ends at lsn {writer.last_lsn}" if writer else "there is no WAL file"
        raise CorruptionError(
            f"the state being served goes up to lsn {lsn}, but {where} and no checkpoint covers lsn {lsn}: records "
            f"are missing; the database must stop and recover (`protobase recover`)"
        )

    def _already_written(self, lsn: int, payload: bytes | list[bytes]) -> bool:
        """True if the ring record `lsn` is in the WAL already (we skip it); CorruptionError if another record is.

        Below the first LSN the coordinator did not hold durable, a record is
        in the WAL (or in a checkpoint) by the coordinator's own account. Above
        it, the WAL holds it only if a predecessor wrote it, and then we read
        it back in `_open_wal`: it must be the same record.
        """
        if lsn > self.writer.last_lsn:
            return False
        expected = self.inherited.pop(lsn, None)
        if expected is not None and expected != zlib.crc32(_joined(payload)):
            raise CorruptionError(
                f"WAL file {self.writer.path} holds a record {lsn} that is not the commit {lsn} being written: the "
                f"WAL belongs to another history; the database must stop and recover (`protobase recover`)"
            )
        return True

    def _wait(self) -> None:
        """Block until the doorbell rings, the flush interval passes or the coordinator goes."""
        if self.unsynced_since is not None:
            timeout = self.flush_interval  # async records wait for their fsync: back in time for it
        else:
            # Everything written is durable, and durable_lsn says so. An async commit rings
            # only when it sees that (durability.py), so one that did not see it yet is
            # already in the ring: look before a long sleep, after a full fence.
            full_fence()
            if self.ring.head != self.ring.tail:
                return
            timeout = 1.0
        doorbell = self.doorbell
        ready = self.busy_poll.wait(lambda: doorbell.poll(0), lambda: doorbell.poll(timeout * 1000), within=timeout)
        for fd, _ in ready:
            if fd == self.job_ended:
                os.read(fd, 64)  # the loop finishes the ended checkpoint
                continue
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                self.coordinator_gone = True

    def _drain(self) -> None:
        """Append every whole ring record with one write, release them, and sync if a sync commit asks.

        A control record (a checkpoint or backup request) cuts the batch:
        what comes before it is written and synced first.
        """
        records, tail = self.ring.read()
        batch: list[bytes | list[bytes]] = []
        sync_needed = False
        for lsn, flags, payload in records:
            if flags & CONTROL:
                self._append(batch)
                batch = []
                self._sync()
                self._start_checkpoint(codec.decode(_joined(payload), frozen=False))
                continue
            if self._already_written(lsn, payload):
                continue  # written by our predecessor before it died
            if lsn != self.writer.next_lsn + len(batch):
                raise CorruptionError(
                    f"the commit ring hands over lsn {lsn}, but the WAL continues at lsn "
                    f"{self.writer.next_lsn + len(batch)}; the database must stop and recover"
                )
            batch.append(payload)
            sync_needed |= bool(flags & SYNC)
        self._append(batch)
        self.ring.release(tail)
        overdue = self.unsynced_since is not None and time.monotonic() - self.unsynced_since >= self.flush_interval
        if sync_needed or overdue:
            self._sync()

    def _append(self, batch: list[bytes | list[bytes]]) -> None:
        """Write `batch` to the WAL (not yet durable); remember since when something waits for its fsync."""
        if batch:
            self.writer.append_many(batch)
            if self.unsynced_since is None:
                self.unsynced_since = time.monotonic()

    def _sync(self) -> None:
        """fsync what was written, then publish and report the durable LSN (in that order, never before)."""
        if self.unsynced_since is None:
            return
        self.writer.sync()
        self.unsynced_since = None
        lsn = self.writer.last_lsn
        self.control.durable_lsn = lsn
        self._report(["durable", lsn])

    def _sync_written(self) -> None:
        """After a failed write: make durable what was written before it, if the disk still lets us.

        A failed write is cut back to the last good record, and the async
        commits before it were acknowledged: syncing them keeps them through
        a later crash. A failed sync here changes nothing: we are stopping.
        """
        if self._writer is None or self._writer.failed is not None:
            return
        try:
            self._sync()
        except (WalSyncError, OSError) as error:
            log.error("could not sync the records written before the failure either: %s", error)

    def _start_checkpoint(self, request: dict[str, Any]) -> None:
        """Start writing the checkpoint (or backup) a control record asks for; the ring is drained meanwhile.

        One at a time, so that reports come in ring order: one still being
        written is finished first. A checkpoint of the WAL's last LSN moves the
        WAL to a new file first, so that what comes while it is written goes
        to a file it does not cover. A request the coordinator sent again after
        our predecessor died with it in flight is older than the WAL: its
        files stay, and only those it covers whole are removed.
        """
        self._finish_checkpoint()
        lsn = request["lsn"]
        writer = self.writer
        if request.get("directory") is None and writer.last_lsn == lsn and writer.first_lsn != lsn + 1:
            writer.close()
            self._writer = WalWriter.create(self.datadir.path, lsn + 1)
        self.job = CheckpointJob(self.datadir.path, self.instance_id, request, self._job_ended_w)

    def _finish_checkpoint(self) -> None:
        """Wait for the checkpoint being written (if any), drop what it covers and report it.

        A checkpoint that could not be written raises its OSError here: the
        disk failed, as when a WAL write fails.
        """
        job, self.job = self.job, None
        if job is None:
            return
        path = job.finish()
        if job.backup is None:
            remove_wal_files_before(self.datadir.path, job.lsn)
            remove_checkpoints_before(self.datadir.path, job.lsn, fsync_directory)
        kind = "backup" if job.backup else "checkpoint"
        log.info("%s %s written in %.3fs", kind, path, time.monotonic() - job.started)
        self._report(["checkpointed", job.lsn, path, job.request.get("id")])

    def _report(self, message: list[object]) -> None:
        """Send `message` to the coordinator; once it has gone, note that and send nothing more."""
        if self.coordinator_gone:
            return
        try:
            send(self.sock, message)
        except OSError:
            self.coordinator_gone = True


def _joined(payload: bytes | list[bytes]) -> bytes:
    """A ring record's payload whole (a record that came in fragments is a list of them; rare here)."""
    return payload if isinstance(payload, bytes) else b"".join(payload)


def main(argv: list[str] | None = None) -> int:
    """The entry point of `python -m protobase.persistence`: serve one instance; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m protobase.persistence")
    parser.add_argument("path", help="data directory (absolute path)")
    parser.add_argument("--instance", required=True)
    parser.add_argument("--fd", type=int, required=True, help="socket shared with the coordinator")
    parser.add_argument("--flush-interval", type=float, default=0.01)
    parser.add_argument("--busy-poll", type=float, default=0.0, help="seconds to poll for the doorbell before a sleep")
    parser.add_argument("--next-lsn", type=int, required=True, help="first LSN the coordinator does not hold durable")
    parser.add_argument("--last-lsn", type=int, required=True, help="last LSN the coordinator has handed out")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    datadir = DataDir(os.path.abspath(args.path))
    persistence = Persistence(datadir, args.instance, sock, args.flush_interval, Collector(), args.busy_poll)
    return persistence.run(args.next_lsn, args.last_lsn)
