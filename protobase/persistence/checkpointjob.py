"""A checkpoint (or backup) written on a thread while the persistence process goes on draining the ring.

Owns that thread and what it reads: the data segments the request names,
attached, copied into the checkpoint file (persistence/checkpoint.py) and
closed by the thread itself. Runs in the persistence process. Writing a
checkpoint of a large database takes seconds; written in the main loop, it
left the commit ring undrained that long, so the ring filled and every
commit waited for the checkpoint: disk latency on the commit path, which
the persistence process exists to keep off it.

Invariant: the main loop learns the outcome only from `finish` (after the
thread has ended), and the segments are pinned by the coordinator until
that outcome is reported to it, so the thread never reads memory that can
be reused. The thread writes one byte to `wake_fd` when it ends, so a main
loop asleep on its doorbell hears it at once.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from protobase.persistence.checkpoint import write_checkpoint
from protobase.persistence.wal import faults
from protobase.persistence.wal.files import fsync_directory
from protobase.shm import names
from protobase.shm.segment import Segment

__all__ = ["CheckpointJob"]


class CheckpointJob:
    """One checkpoint or backup request (the decoded control record) being written."""

    def __init__(self, directory: str, instance_id: str, request: dict[str, Any], wake_fd: int) -> None:
        self.request = request
        self.lsn: int = request["lsn"]
        self.backup: str | None = request.get("directory")  # a backup: written there, the WAL untouched
        self.target = self.backup or directory
        self.instance_id = instance_id
        self.wake_fd = wake_fd
        self.started = time.monotonic()
        self.path: str | None = None  # the file written, once it is
        self.error: BaseException | None = None  # why it could not be written
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-{self.lsn}", daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def finish(self) -> str:
        """Wait for the thread; the path written, or raise what stopped it (an OSError: a disk failure)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.path is not None
        return self.path

    def _run(self) -> None:
        try:
            faults.hold_checkpoint()
            self.path = self._write()
        except BaseException as error:  # handed to the main loop by finish()
            self.error = error
        finally:
            try:
                os.write(self.wake_fd, b"\x01")
            except OSError:
                pass  # the main loop stopped listening: it joins us anyway

    def _write(self) -> str:
        request = self.request
        wanted = request["segments"]  # [[index, used bytes], ...]
        segments = [(index, Segment.attach(names.data_name(self.instance_id, index))) for index, _ in wanted]
        try:
            views = [(index, segment.buf[:used]) for (index, segment), (_, used) in zip(segments, wanted)]
            path = write_checkpoint(
                self.target,
                lsn=self.lsn,
                seq=request["seq"],
                root=request["root"],
                next_segment=request["next_segment"],
                segments=views,
                fsync_directory=fsync_directory,
            )
            del views
            return path
        finally:
            for _, segment in segments:
                segment.close()
