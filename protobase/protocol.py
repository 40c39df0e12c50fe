"""The client <-> coordinator wire protocol over the data directory's Unix socket.

Owns message framing. A frame is a u32 little-endian body length followed by
the body: one msgpack message in the value format of codec.py (so user values
travel with their extension types, never pickled). Requests and replies are
arrays whose first element names them:

    request                                              reply
    ["hello", format_version]                            ["ok", instance_id, reader_slot]
    ["commit", base_seq, serializable, ops, reads]       ["ok", seq, [[op_index, ptr], ...]]
                                                         ["conflict", path, base_seq, seq]
    ["stats"]                                            ["ok", {name: number}]
    ["compact"]                                          ["ok", seq]
    any                                                  ["error", error_class_name, message]

`ops` are [code, path, argument] (codes in coordinator/writer.py); `reads` are
paths. The peer's pid and uid come from SO_PEERCRED, never from the message.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any

from . import codec
from .errors import CoordinatorError

__all__ = ["send", "receive", "FrameReader", "peer_credentials", "MAX_FRAME"]

LENGTH = struct.Struct("<I")
MAX_FRAME = 1 << 30
STALL_TIMEOUT = 10.0  # seconds a non-blocking send waits for a peer that reads nothing

_PEERCRED = struct.Struct("3i")


def send(sock: socket.socket, message: Any, stall_timeout: float = STALL_TIMEOUT) -> None:
    """Encode and send one whole message.

    On a non-blocking socket (the coordinator's side: it never sleeps in a
    syscall it could avoid) it waits for room only when the peer's buffer is
    full, and raises TimeoutError (an OSError) if the peer reads nothing for
    `stall_timeout` seconds, so a client that stops reading cannot stall the
    coordinator.
    """
    body = codec.encode(message)
    if len(body) > MAX_FRAME:
        raise CoordinatorError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit; "
                               f"split the transaction")
    frame = LENGTH.pack(len(body)) + body
    if sock.gettimeout() != 0.0:
        sock.sendall(frame)
        return
    view = memoryview(frame)
    deadline = None
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            deadline = deadline or time.monotonic() + stall_timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [sock], [], remaining)[1]:
                raise TimeoutError(f"the peer read nothing for {stall_timeout}s") from None


def receive(sock: socket.socket) -> Any:
    """Receive one message (blocking); CoordinatorError if the peer closed the socket."""
    header = _exactly(sock, LENGTH.size)
    (length,) = LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise CoordinatorError(f"peer sent a frame of {length} bytes, over the limit")
    return codec.decode(_exactly(sock, length), frozen=False)


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise CoordinatorError("the connection to the coordinator was closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class FrameReader:
    """Reassembles frames from non-blocking reads (coordinator side)."""

    def __init__(self) -> None:
        self.buffer = bytearray()  # bytes received and not yet parsed

    def feed(self, data: bytes) -> list[Any]:
        """Add received bytes; return every message now complete."""
        self.buffer += data
        messages = []
        while len(self.buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self.buffer)
            if length > MAX_FRAME:
                raise CoordinatorError(f"client sent a frame of {length} bytes, over the limit")
            end = LENGTH.size + length
            if len(self.buffer) < end:
                break
            messages.append(codec.decode(bytes(self.buffer[LENGTH.size:end]), frozen=False))
            del self.buffer[:end]
        return messages


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
