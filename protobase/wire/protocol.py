"""The client <-> coordinator wire protocol over the data directory's Unix socket.

Owns message framing, the request and reply envelopes, and the bounds on what
a peer may make the other side buffer. Both sides use it: the coordinator
(`FrameReader`, `send`, `parse_request`) and the client's connection
(connection.py).

A frame is a u32 little-endian body length followed by the body: one msgpack
message in the value format of codec.py (so user values travel with their
extension types, never pickled). A body is at most `MAX_FRAME` bytes.

Every request is an array `[request_id, verb, *arguments]`, every reply
`[request_id, status, *fields]`, where `request_id` is the positive integer
the client chose (increasing per connection) and the reply repeats it. Since
a client may stop waiting for a reply (Ctrl-C) and send its next request, and
the coordinator answers a sync commit only once it is durable, replies can
arrive late and out of order; the id says which request each answers, so a
reply is never taken for another's. Messages the coordinator sends on its own
(watch notifications) carry request id 0.

    request                                                 reply
    [id, "hello", format_version]                           [id, "ok", instance_id, reader_slot]
    [id, "commit", base_seq, serializable, durability,      [id, "ok", seq, [[op_index, ptr], ...]]
         ops_bytes, reads]                                  [id, "conflict", path, base_seq, seq]
    [id, "watch", format_version, [prefix, ...]]            [id, "ok", published_seq], then
                                                            [0, "changed", seq, [path, ...]] per commit
    [id, "stats"]                                           [id, "ok", {name: number}]
    [id, "compact"]                                         [id, "ok", seq]
    [id, "checkpoint"]                                      [id, "ok", seq]
    [id, "backup", destination]                             [id, "ok", seq, checkpoint_file]
    any                                                     [id, "error", error_class_name, message]

`ops_bytes` is the encoded list of [code, path, argument] ops (codes in
coordinator/writer.py), `reads` a list of paths, `durability` "sync" or
"async". The peer's pid and uid come from SO_PEERCRED, never from a message.

The socket is untrusted on the coordinator's side: `parse_request` checks the
envelope and the argument types of every verb and raises ProtocolError,
which the coordinator answers with an error reply; a frame announcing more
than `MAX_FRAME` bytes cannot be skipped, so that connection is closed.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any

from protobase.core import codec
from protobase.errors import CoordinatorError, CorruptionError, ProtocolError

__all__ = ["send", "encode_frame", "FrameReader", "parse_request", "peer_credentials", "MAX_FRAME", "PUSH",
           "REQUEST_ARGUMENTS", "MalformedRequest"]

LENGTH = struct.Struct("<I")
MAX_FRAME = 256 << 20  # bytes of one message body: a commit larger than this must be split
STALL_TIMEOUT = 10.0  # seconds a non-blocking send waits for a peer that reads nothing
PUSH = 0  # request id of the messages the coordinator sends unasked
MAX_REQUEST_ID = 2**63 - 1

#: {verb -> the types of its arguments, in order}: what `parse_request` accepts.
REQUEST_ARGUMENTS: dict[str, tuple[type, ...]] = {
    "hello": (int,),
    "commit": (int, bool, str, bytes, list),
    "watch": (int, list),
    "stats": (),
    "compact": (),
    "checkpoint": (),
    "backup": (str,),
}

_PEERCRED = struct.Struct("3i")


def encode_frame(message: Any) -> bytes:
    """The frame of one message: its length, then its body."""
    body = codec.encode(message)
    if len(body) > MAX_FRAME:
        raise CoordinatorError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit; "
                               f"split the transaction")
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
            view = view[sock.send(view):]
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
        while len(buffer) - start >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buffer, start)
            if length > self.max_frame:
                raise ProtocolError(f"peer sent a frame of {length} bytes, over the {self.max_frame}-byte limit")
            end = start + LENGTH.size + length
            if len(buffer) < end:
                break
            bodies.append(bytes(buffer[start + LENGTH.size:end]))
            start = end
        if start:
            del buffer[:start]
        return bodies

    def feed(self, data: bytes | memoryview) -> list[Any]:
        """Add received bytes; return every message now complete, decoded (for trusted peers)."""
        return [codec.decode(body, frozen=False) for body in self.feed_bodies(data)]


class MalformedRequest(ProtocolError):
    """A request that `parse_request` refused, with the id to address the error reply to."""

    def __init__(self, request_id: int, why: str) -> None:
        super().__init__(f"malformed request: {why}")
        self.request_id = request_id  # PUSH when the request had no usable id


def parse_request(body: bytes) -> tuple[int, str, list]:
    """(request id, verb, arguments) of a request body; MalformedRequest if it is not a well-formed request.

    The error carries the request id (PUSH when the body has none), so that
    the coordinator can still address its error reply.
    """
    try:
        message = codec.decode(body, frozen=False, opaque_dataclasses=True)
    except CorruptionError as error:
        raise MalformedRequest(PUSH, f"the request is not a valid message ({error})") from None
    if not isinstance(message, list) or not message:
        raise MalformedRequest(PUSH, f"a request is an array [request_id, verb, ...], not {type(message).__name__}")
    request_id = message[0]
    if type(request_id) is not int or not 0 < request_id <= MAX_REQUEST_ID:
        raise MalformedRequest(PUSH, f"a request id is an integer in 1..2**63-1, not {_describe(request_id)}")
    if len(message) < 2 or type(message[1]) is not str or message[1] not in REQUEST_ARGUMENTS:
        verb = _describe(message[1]) if len(message) > 1 else "none"
        raise MalformedRequest(request_id, f"unknown request {verb}; known: {sorted(REQUEST_ARGUMENTS)}")
    verb, arguments = message[1], message[2:]
    expected = REQUEST_ARGUMENTS[verb]
    if len(arguments) != len(expected) or not all(type(argument) is kind
                                                  for argument, kind in zip(arguments, expected)):
        received = [type(argument).__name__ for argument in arguments]
        raise MalformedRequest(request_id, f"a {verb!r} request takes arguments of types "
                                     f"{[kind.__name__ for kind in expected]}, got {received}")
    return request_id, verb, arguments


def _describe(value: Any) -> str:
    # A short description of an untrusted value: a crafted one may be huge.
    if type(value) is str:
        return repr(value[:40])
    if type(value) is int and value.bit_length() <= 64:
        return repr(value)
    return f"a {type(value).__name__}"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
