"""The floor of ProtoBase's read path: msgpack records in one POSIX shared-memory segment.

The segment holds the records, each msgpack-encoded, back to back; a reader
maps it once, builds {key: (start, end)} from the offset index stored after
the records (untimed) and decodes `msgpack.unpackb(view[start:end])` per read.
Read-only: no commits, no transfers.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

from .base import Client, Store

PREFIX = "/protobase-bench-msgpack."
HEADER = struct.Struct("<QQ")  # offset and length of the msgpack-encoded index


class ShmClient(Client):
    def __init__(self, name: str) -> None:
        import msgpack
        import posix_ipc

        memory = posix_ipc.SharedMemory(name)
        try:
            self.map = mmap.mmap(memory.fd, memory.size, prot=mmap.PROT_READ)
        finally:
            memory.close_fd()
        self.view = memoryview(self.map)
        start, length = HEADER.unpack_from(self.view, 0)
        keys, offsets = msgpack.unpackb(self.view[start : start + length])
        self.index = {key: (offsets[i], offsets[i + 1]) for i, key in enumerate(keys)}
        self.unpackb = msgpack.unpackb

    def get(self, key: str) -> Any:
        start, end = self.index[key]
        return self.unpackb(self.view[start:end])

    def query(self, city: str, score: int) -> list:
        view, unpackb, found = self.view, self.unpackb, []
        for start, end in self.index.values():
            r = unpackb(view[start:end])
            if r["city"] == city and r["score"] > score:
                found.append(r)
        return found

    def close(self) -> None:
        self.view.release()
        self.map.close()


class MsgpackShm(Store):
    name = "msgpack+shm"
    method = "msgpack.unpackb(segment[start:end]), offsets in a private dict"
    query_method = "scan, decoding every record"
    modes = ()
    transfers = False

    def start(self, tmp: str) -> None:
        self.name_ = f"{PREFIX}{os.getpid()}.{os.urandom(6).hex()}"
        self.size = 0

    def load(self, records: dict[str, dict]) -> None:
        import msgpack
        import posix_ipc

        blobs = [msgpack.packb(r) for r in records.values()]
        offsets = [HEADER.size]
        for blob in blobs:
            offsets.append(offsets[-1] + len(blob))
        index = msgpack.packb([list(records), offsets])
        self.size = offsets[-1] + len(index)
        memory = posix_ipc.SharedMemory(self.name_, posix_ipc.O_CREX, mode=0o600, size=self.size)
        try:
            with mmap.mmap(memory.fd, self.size) as buffer:
                HEADER.pack_into(buffer, 0, offsets[-1], len(index))
                buffer[HEADER.size : offsets[-1]] = b"".join(blobs)
                buffer[offsets[-1] :] = index
        finally:
            memory.close_fd()

    def spec(self) -> dict:
        return {"name": self.name_}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return ShmClient(spec["name"])

    def info(self) -> dict:
        return {"shared": self.size}

    def stop(self) -> None:
        import posix_ipc

        try:
            posix_ipc.unlink_shared_memory(self.name_)
        except posix_ipc.ExistentialError:
            pass
