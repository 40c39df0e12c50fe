"""Frames on the coordinator's Unix socket: a length, then one msgpack message.

Owns the framing and the bound on what a peer may make the other side buffer.
Both sides use it: the coordinator (`FrameReader`, `send`), the client's
connection (`encode_frame`, `FrameReader`) and the persistence process
(`send`, on the socket it shares with its coordinator). What the messages
say (requests, replies, verbs) is `verbs.py`'s.

A frame is a u32 little-endian body length followed by the body: one msgpack
message in the value format of codec.py (so user values travel with their
extension types, never pickled). A body is at most `MAX_FRAME` bytes; a frame
announcing more cannot be skipped, so the reader raises ProtocolError and the
connection is closed. The peer's pid and uid come from SO_PEERCRED
(`peer_credentials`), never from a message.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any

from protobase.core import codec
from protobase.errors import CoordinatorError, ProtocolError

__all__ = ["send", "encode_frame", "FrameReader", "peer_credentials", "MAX_FRAME"]

LENGTH = struct.Struct("<I")
MAX_FRAME = 256 << 20  # bytes of one message body: a commit larger than this must be split
STALL_TIMEOUT = 10.0  # seconds a non-blocking send waits for a peer that reads nothing
_PEERCRED = struct.Struct("3i")


def encode_frame(message: Any) -> bytes:
    """The frame of one message: its length, then its body."""
    body = codec.encode(message)
    if len(body) > MAX_FRAME:
        raise CoordinatorError(
            f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit; split the transaction"
        )
    return LENGTH.pack(len(body)) + body


def send(sock: socket.socket, message: Any, stall_timeout: float = STALL_TIMEOUT) -> None:
    """Encode and send one whole message.

    On a non-blocking socket (the coordinator's side: it never sleeps in a
    syscall it could avoid) it waits for room only when the peer's buffer is
    full, and raises TimeoutError (an OSError) if the peer reads nothing for
    `stall_timeout` seconds, so a client that stops reading cannot stall the
    coordinator.
    """
    frame = encode_frame(message)
    if sock.gettimeout() != 0.0:
        sock.sendall(frame)
        return
    view = memoryview(frame)
    deadline = None
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            deadline = deadline or time.monotonic() + stall_timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [sock], [], remaining)[1]:
                raise TimeoutError(f"the peer read nothing for {stall_timeout}s") from None


class FrameReader:
    """Reassembles frames from the bytes of a stream, as they arrive.

    It holds at most one incomplete frame (`buffered` bytes); a length prefix
    over `max_frame` raises ProtocolError, since the stream cannot be resumed
    after a frame that will not be read.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()  # bytes received and not yet parsed
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes held for frames not yet complete."""
        return len(self.buffer)

    def feed_bodies(self, data: bytes | memoryview) -> list[bytes]:
        """Add received bytes; return the body of every frame now complete, undecoded."""
        self.buffer += data
        bodies = []
        start = 0
        buffer = self.buffer
        with memoryview(buffer) as view:  # a body is copied once, not sliced then copied (a bulk load's 50 MB)
            while len(buffer) - start >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buffer, start)
                if length > self.max_frame:
                    raise ProtocolError(f"peer sent a frame of {length} bytes, over the {self.max_frame}-byte limit")
                end = start + LENGTH.size + length
                if len(buffer) < end:
                    break
                bodies.append(bytes(view[start + LENGTH.size : end]))
                start = end
        if start:
            del buffer[:start]
        return bodies

    def feed(self, data: bytes | memoryview) -> list[Any]:
        """Add received bytes; return every message now complete, decoded (for trusted peers)."""
        return [codec.decode(body, frozen=False) for body in self.feed_bodies(data)]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
