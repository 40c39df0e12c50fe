"""The coordinator's side of durability: the commit ring and the persistence process.

Owns the producer end of the commit ring, the persistence child process (its
start, its restart after a crash, its stop) and the socket it reports on.
`enqueue` hands a commit's WAL payload to the ring and rings the doorbell; the
persistence process answers with the durable LSN, which the server uses to
acknowledge "sync" commits (group commit: one fsync answers many). An "async"
commit rings only when the persistence process may be asleep, that is when
every record before it is durable; otherwise the process is due back within
`flush_interval` anyway, and waking it per commit only took CPU from the
committers.

Invariant: LSNs are handed out consecutively, one per commit, in commit
order, and the ring carries them in that order. A persistence process killed
by a signal is restarted and resumes from the ring's tail (it skips a record
only if the WAL holds that very record, and refuses a WAL that goes past the
last LSN handed out); one that reports a disk failure is not restarted: the
coordinator stops acknowledging instead (never retry after a failed fsync).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from protobase.core import codec
from protobase.core.datadir import DataDir
from protobase.persistence.process import EXIT_DISK_FAILURE
from protobase.shm import names
from protobase.shm.control import ControlBlock, full_fence
from protobase.shm.ring import CONTROL, SYNC, CommitRing
from protobase.wire.framing import FrameReader

__all__ = ["Durability", "DurabilityFailed"]

log = logging.getLogger("protobase.coordinator")

# A persistence process that keeps dying (a bug or a disk that kills it at once, an OOM killer
# that keeps choosing it) must stop the database rather than be restarted forever, while deaths
# far apart (an operator's kill -9, one OOM kill a month) each deserve a restart: so only the
# restarts of the last RESTART_WINDOW seconds count, never a lifetime total. A crash loop
# restarts about every 0.2 s (one interpreter start-up) and reaches RESTART_LIMIT in seconds;
# no sporadic cause comes near 10 deaths in 5 minutes.
RESTART_LIMIT = 10
RESTART_WINDOW = 300.0
STOP_TIMEOUT = 60.0
REPORT_CHUNK = 1 << 16  # bytes read from the persistence socket at a time


class DurabilityFailed(Exception):
    """The write-ahead log can no longer make commits durable."""


class Durability:
    """Ring producer and persistence supervisor (coordinator only)."""

    def __init__(
        self,
        datadir: DataDir,
        instance_id: str,
        control: ControlBlock,
        *,
        next_lsn: int,
        flush_interval: float,
        busy_poll: float = 0.0,
        ring_capacity: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datadir = datadir
        self.instance_id = instance_id
        self.control = control  # where the persistence process publishes the durable LSN
        self.flush_interval = flush_interval
        self.busy_poll = busy_poll  # the persistence process's, for its doorbell (wire/busypoll.py)
        self.next_lsn = next_lsn  # LSN of the next commit
        self.durable_lsn = next_lsn - 1  # every commit up to here is fsynced
        self.ring = CommitRing.create(
            names.segment_name(instance_id, "ring"), **({"capacity": ring_capacity} if ring_capacity else {})
        )
        self.process: subprocess.Popen[bytes] | None = None  # the persistence process, once started
        self.sock: socket.socket | None = None  # our end of the socketpair with the child
        self.reader = FrameReader()
        self.inbox: list[list[Any]] = []  # reports received and not yet handed to read_reports' caller
        self.clock = clock  # seconds, for the restart window (a fake one in tests)
        self.restart_times: collections.deque[float] = collections.deque()  # clock() of recent restarts
        self.failure: str | None = None  # why commits can no longer be made durable
        self.wal_bytes = 0  # payload bytes enqueued since the last checkpoint request
        self.syncs = 0  # fdatasyncs the persistence processes reported (one "durable" report each)
        # Checkpoint and backup requests not yet reported written: {id: (control record, ring position
        # after it)}, in ring order; those a dead child took off the ring are sent again to its successor.
        self.controls: dict[int, tuple[bytes, int]] = {}
        self.next_control_id = 1

    # -- the child ----------------------------------------------------------------

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        command = [
            sys.executable,
            "-m",
            "protobase.persistence",
            self.datadir.path,
            "--instance",
            self.instance_id,
            "--fd",
            str(theirs.fileno()),
            "--flush-interval",
            str(self.flush_interval),
            "--busy-poll",
            str(self.busy_poll),
            "--next-lsn",
            str(self.durable_lsn + 1),
            "--last-lsn",
            str(self.next_lsn - 1),
            "--log-level",
            logging.getLevelName(logging.getLogger().level),
        ]
        self.process = subprocess.Popen(
            command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
        )
        theirs.close()
        self.sock = ours
        self.reader = FrameReader()

    def wait_started(self, timeout: float = 60.0) -> None:
        """Block until the child holds the WAL open; raise DurabilityFailed if it cannot."""
        process = self.process
        assert process is not None, "wait_started() before start()"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.sock is not None:
            select.select([self.sock], [], [], 0.05)
            if any(message[0] == "started" for message in self.read_reports()):
                return
            if self.failure or process.poll() is not None:
                break
        raise DurabilityFailed(
            self.failure
            or f"the persistence process did not start (exit status "
            f"{process.poll()}); see {self.datadir.file('coordinator.log')}"
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def check_child(self) -> bool:
        """Restart a persistence process killed by a signal; True if one was restarted.

        Raises DurabilityFailed when it exited on a disk error, or when it died
        more than RESTART_LIMIT times within RESTART_WINDOW seconds.
        """
        if self.process is None or self.process.poll() is None or self.failure is not None:
            return False  # alive; or failed already, and not to be restarted
        code = self.process.returncode
        self._receive()  # its last reports: the reason of a failure among them
        self._close_socket()
        if self.failure is not None or code == EXIT_DISK_FAILURE:
            self.failure = self.failure or "the persistence process stopped on a disk error"
            raise DurabilityFailed(self.failure)
        now = self.clock()
        while self.restart_times and self.restart_times[0] <= now - RESTART_WINDOW:
            self.restart_times.popleft()
        if len(self.restart_times) >= RESTART_LIMIT:
            self.failure = (
                f"the persistence process died {RESTART_LIMIT + 1} times within {RESTART_WINDOW:.0f}s "
                f"(last exit status {code}); see {self.datadir.file('coordinator.log')}"
            )
            raise DurabilityFailed(self.failure)
        self.restart_times.append(now)
        log.warning("persistence process %d exited with status %s; restarting it", self.process.pid, code)
        self.start()
        self._resend_controls()
        self.doorbell()
        return True

    def _resend_controls(self) -> None:
        """Put back on the ring the requests in flight that the dead child had taken off it.

        It writes a checkpoint on a thread after releasing its control record
        from the ring: killed meanwhile, the request would never be answered
        (and its segments stay pinned for ever). One still on the ring is read
        by the new child as it is.
        """
        tail = self.ring.tail
        for request_id, (payload, end) in list(self.controls.items()):
            if end <= tail:
                self._append_control(request_id, payload)

    def _close_socket(self) -> None:
        # The server unregisters it from its selector when it sees sock is None.
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- producing --------------------------------------------------------------

    def enqueue(self, payload: bytes | Sequence[bytes], sync: bool) -> int:
        """Hand one commit's WAL payload (or its parts, see Ring.append) to the persistence process; return its LSN.

        Raises DurabilityFailed once the WAL failed, which the persistence
        process flags in the control segment the moment it happens: an
        "async" commit is acknowledged as soon as it is handed over, so
        waiting for the report to be read would acknowledge commits that
        will never reach the disk.
        """
        self._check_not_failed()
        lsn = self.next_lsn
        self.wal_bytes += self.ring.append(lsn, SYNC if sync else 0, payload, wait=self._wait_for_room)
        self.next_lsn += 1
        if sync or self._persistence_may_sleep(lsn) or self.ring.head - self.ring.tail > self.ring.capacity // 2:
            self.doorbell()
        return lsn

    def _check_not_failed(self) -> None:
        if self.failure is None and self.control.wal_failed:
            self._receive()  # the persistence process sent its reason before raising the flag
            self.failure = self.failure or "the write-ahead log failed (see coordinator.log)"
        if self.failure is not None:
            raise DurabilityFailed(self.failure)

    def _persistence_may_sleep(self, lsn: int) -> bool:
        """False while records before `lsn` are not yet durable: the persistence process then
        syncs within flush_interval and drains ours on the way.

        It sleeps long only once everything it wrote is durable, and it looks at the ring
        after publishing durable_lsn and before sleeping (persistence/process.py). We published our
        record (the ring's head) before reading durable_lsn; with a full fence on both
        sides, one of the two reads sees the other's write, so a record is never left
        waiting for a sleeper.
        """
        full_fence()
        return self.control.durable_lsn >= lsn - 1

    def request_checkpoint(
        self, *, seq: int, root: int, segments: list[tuple[int, int]], next_segment: int, directory: str | None = None
    ) -> int:
        """Ask for a checkpoint of the state after the last enqueued commit; return the request's id.

        Its report ("checkpointed", read_reports) names that id. With
        `directory` it is a backup written there; the WAL is not touched.
        Raises DurabilityFailed once the WAL failed: no one would write it.
        """
        self._check_not_failed()
        request_id, self.next_control_id = self.next_control_id, self.next_control_id + 1
        payload = codec.encode(
            {
                "id": request_id,
                "lsn": self.next_lsn - 1,
                "seq": seq,
                "root": root,
                "next_segment": next_segment,
                "segments": [list(entry) for entry in segments],
                "directory": directory,
            }
        )
        self._append_control(request_id, payload)
        if directory is None:
            self.wal_bytes = 0
        self.doorbell()
        return request_id

    def _append_control(self, request_id: int, payload: bytes) -> None:
        self.ring.append(0, CONTROL, payload, wait=self._wait_for_room)
        self.controls[request_id] = (payload, self.ring.head)

    def doorbell(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(b"\x01")
        except BlockingIOError:
            pass  # the doorbell is already ringing: unread bytes wake it just the same
        except OSError:
            pass  # the child is gone; check_child() will notice

    def _wait_for_room(self) -> None:
        # Back-pressure: the ring is full. The child frees room as it writes, unless it failed.
        # Ring: with everything before this record durable it may be asleep (for up to a
        # second), and a record larger than the ring is only rung for once it is whole.
        self._check_not_failed()
        self.check_child()
        self.doorbell()
        time.sleep(0.0005)

    # -- reports ------------------------------------------------------------------

    def read_reports(self) -> list[list[Any]]:
        """Messages the child sent: ["durable", lsn], ["checkpointed", lsn, path, request id], ["failed", why],
        ["started", lsn]."""
        self._receive()
        messages, self.inbox = self.inbox, []
        return messages

    def _receive(self) -> None:
        """Move what the child sent into `inbox`, taking note of durable LSNs and failures."""
        if self.sock is None:
            return
        messages = []
        while True:
            try:
                data = self.sock.recv(REPORT_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._close_socket()
                break
            messages.extend(self.reader.feed(data))
            if len(data) < REPORT_CHUNK:
                break  # drained: more later wakes the selector again, no need for a recv that fails

        for message in messages:
            if message[0] in ("durable", "started"):  # a starting child syncs what it inherited
                self.durable_lsn = max(self.durable_lsn, message[1])
                self.syncs += 1
            elif message[0] == "checkpointed":
                self.controls.pop(message[3], None)
            elif message[0] == "failed":
                self.failure = f"the write-ahead log failed: {message[1]}"
        self.inbox.extend(messages)

    # -- stopping -----------------------------------------------------------------

    def stop(self) -> None:
        """Close the doorbell; the child drains the ring, syncs and exits. Wait for it."""
        self._close_socket()
        if self.process is not None:
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("persistence process %d did not stop; killing it", self.process.pid)
                self.process.kill()
                self.process.wait()
            self.process = None
        self.ring.unlink()
        self.ring.close()
