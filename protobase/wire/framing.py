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

import mmap
import select
import socket
import struct
import time
from typing import Any

from protobase.core import codec
from protobase.errors import CoordinatorError, ProtocolError

__all__ = ["send", "encode_frame", "frame_pieces", "FrameReader", "Body", "peer_credentials", "MAX_FRAME"]

LENGTH = struct.Struct("<I")
MAX_FRAME = 256 << 20  # bytes of one message body: a commit larger than this must be split
LARGE_BODY = 1 << 20  # bytes of a body received into a buffer of its own size (FrameReader)
#: A frame's body: bytes, or a memoryview of the buffer a large one was received into.
Body = bytes | memoryview
STALL_TIMEOUT = 10.0  # seconds a non-blocking send waits for a peer that reads nothing
_PEERCRED = struct.Struct("3i")


def encode_frame(message: Any) -> bytes:
    """The frame of one message: its length, then its body."""
    body = codec.encode(message)
    _check_length(len(body))
    return LENGTH.pack(len(body)) + body


def frame_pieces(message: list[Any]) -> list[bytes]:
    """The frame of `message` as pieces to send in order: joined, they are `encode_frame(message)`.

    A bytes item of `LARGE_BODY` bytes or more (a bulk commit's ops) is a
    piece of its own, sent from where it is: packed into one frame, it was
    copied twice more (57 MB for a million records).
    """
    for item in message:  # (a loop, not any(): this is on every commit's way out)
        if type(item) is bytes and len(item) >= LARGE_BODY:
            break
    else:
        return [encode_frame(message)]
    pieces: list[bytes] = []
    run = [codec.array_header(len(message))]  # encodings of the items between large ones: one piece
    for item in message:
        if type(item) is bytes and len(item) >= LARGE_BODY:
            pieces += [b"".join([*run, codec.bin_header(len(item))]), item]
            run = []
        else:
            run.append(codec.encode(item))
    pieces.append(b"".join(run))
    length = sum(map(len, pieces))
    _check_length(length)
    pieces[0] = LENGTH.pack(length) + pieces[0]
    return pieces


def _check_length(length: int) -> None:
    if length > MAX_FRAME:
        raise CoordinatorError(
            f"message of {length} bytes exceeds the {MAX_FRAME}-byte frame limit; split the transaction"
        )


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
    after a frame that will not be read. A body of `LARGE_BODY` bytes or more
    is received into a mapping of its own size, filled as it arrives and
    handed over as a memoryview: appended to a growing buffer and then copied
    out, a bulk load's 57 MB took 0.37 s of its coordinator's time (py-spy).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()  # bytes received and not yet parsed
        self.max_frame = max_frame
        self.large: mmap.mmap | None = None  # the large body being received, if one is
        self.filled = 0  # bytes of it received so far

    @property
    def buffered(self) -> int:
        """Bytes held for frames not yet complete (of a large body: those received; the rest is not yet paged in)."""
        return len(self.buffer) + self.filled

    def feed_bodies(self, data: bytes | memoryview) -> list[Body]:
        """Add received bytes; return the body of every frame now complete, undecoded."""
        bodies: list[Body] = []
        if self.large is None:  # the common case: no memoryview to make
            self.buffer += data
            self._split_buffer(bodies)
            return bodies
        with memoryview(data) as view:
            rest = self._fill_large(view, bodies)
            if rest:
                self.buffer += rest
                self._split_buffer(bodies)
        return bodies

    def _split_buffer(self, bodies: list[Body]) -> None:
        """Move the frames `buffer` completes to `bodies`; a large one it begins goes on in `large`."""
        buffer, start = self.buffer, 0
        with memoryview(buffer) as view:  # a body is copied once, not sliced then copied
            while len(buffer) - start >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buffer, start)
                if length > self.max_frame:
                    raise ProtocolError(f"peer sent a frame of {length} bytes, over the {self.max_frame}-byte limit")
                body_start = start + LENGTH.size
                end = body_start + length
                if len(buffer) < end:
                    if length >= LARGE_BODY:
                        self.large, self.filled = mmap.mmap(-1, length), 0
                        start = len(buffer)
                        self._fill_large(view[body_start:], bodies)
                    break
                bodies.append(bytes(view[body_start:end]))
                start = end
        if start:
            del buffer[:start]

    def _fill_large(self, data: memoryview, bodies: list[Body]) -> memoryview:
        """Copy what `data` holds of the large body into it; return what follows the body."""
        large = self.large
        assert large is not None, "a large body is being received"
        taken = min(len(data), len(large) - self.filled)
        large[self.filled : self.filled + taken] = data[:taken]
        self.filled += taken
        if self.filled == len(large):
            bodies.append(memoryview(large))
            self.large, self.filled = None, 0
        return data[taken:]

    def feed(self, data: bytes | memoryview) -> list[Any]:
        """Add received bytes; return every message now complete, decoded (for trusted peers)."""
        return [codec.decode(body, frozen=False) for body in self.feed_bodies(data)]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
