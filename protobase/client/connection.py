"""A client's connection to its coordinator: exchanges that an interruption cannot desynchronise.

Owns one Unix socket of a client process (a Database handle's, or a
Watcher's) and the state of the stream on it: the next request id, the bytes
of a reply received in part, and the replies that arrived for requests whose
caller stopped waiting. Runs in client processes; a Database calls it under
its lock, one exchange at a time. It busy polls for a reply before it sleeps
on the socket (wire/busypoll.py).

Invariant: the connection is *settled* (every request frame went out whole,
every byte received is filed: a whole reply parked under its request id, a
partial one kept for later) or it is *broken* and never used again. An
exception that lands while a caller waits for a reply (Ctrl-C, a timeout
signal) leaves it settled: that reply is filed when it comes, by its request
id, and `wait_reply` can still collect it, so no caller ever takes another
request's reply for its own. An exception inside a send, or between a recv
and the filing of its bytes, breaks it; the owner then opens a new one.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from typing import Any

from protobase.core import codec
from protobase.errors import CoordinatorError, CorruptionError, ProtoBaseError, ProtocolError
from protobase.settings import DEFAULTS
from protobase.wire.busypoll import BusyPoll
from protobase.wire.error_table import error_from_reply
from protobase.wire.framing import Body, FrameReader, frame_pieces
from protobase.wire.verbs import PUSH

__all__ = ["Connection", "Refusal", "error_from_reply"]

RECEIVE_BYTES = 1 << 16  # read at a time
MAX_PARKED = 1024  # replies kept for callers that stopped waiting; the oldest go first


class Refusal(CoordinatorError):
    """The coordinator refused this connection and hung up; `error` is what it said."""

    def __init__(self, error: ProtoBaseError) -> None:
        super().__init__(str(error))
        self.error = error


def _milliseconds_left(deadline: float | None) -> float | None:
    """Milliseconds until `deadline` (a time.monotonic()), as poll() takes them; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000


class Connection:
    """Requests and replies over one socket to the coordinator, matched by request id."""

    def __init__(self, sock: socket.socket, busy_poll: float = DEFAULTS.busy_poll) -> None:
        self._sock = sock  # blocking; we poll before every recv
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._busy = BusyPoll(busy_poll)  # a reply that comes soon is taken without a wake-up
        self._reader = FrameReader()  # holds a reply frame received in part
        self._chunk = bytearray(RECEIVE_BYTES)  # recv_into target, reused
        self._next_id = 1
        self._last_sent = 0  # id of the last request sent whole
        self._parked: dict[int, list[Any]] = {}  # {request id -> reply fields}, in arrival order
        self.pushes: deque[list[Any]] = deque()  # messages the coordinator sent unasked, in order
        self._settled = True  # False from a send or recv until its bytes are accounted for
        self._closed = False

    @property
    def broken(self) -> bool:
        """True once the stream may be out of step, or the peer closed it: open a new connection."""
        return self._closed or not self._settled

    def request(self, message: list[Any]) -> list[Any]:
        """Send a request and wait for its reply; return the reply's fields ([status, ...])."""
        request_id = self.reserve()
        self.send(request_id, message)
        reply = self.wait_reply(request_id)
        assert reply is not None, "a wait without a timeout ends with the reply"
        self.release(request_id)
        return reply

    def reserve(self) -> int:
        """A fresh request id, for a request about to be sent with `send`."""
        request_id = self._next_id
        self._next_id = request_id + 1
        return request_id

    def send(self, request_id: int, message: list[Any]) -> None:
        """Send `[request_id, *message]` whole; its reply will carry `request_id`."""
        pieces = frame_pieces([request_id, *message])  # raises before anything is sent
        self._settled = False  # an interrupted sendall leaves part of the frame on the wire
        try:
            for piece in pieces:
                self._sock.sendall(piece)
        except OSError:
            self._closed = True
            self._raise_refusal()  # the coordinator may have said why it hung up
            raise
        self._last_sent = request_id
        self._settled = True

    def may_have_sent(self, request_id: int) -> bool:
        """False only if request `request_id` certainly never reached the wire (its send was interrupted first)."""
        return request_id <= self._last_sent or not self._settled

    def wait_reply(self, request_id: int, timeout: float | None = None) -> list[Any] | None:
        """The reply to `request_id`, waiting up to `timeout` seconds (None: for ever); None on timeout.

        Replies to other requests that arrive meanwhile are parked for their
        own callers. The reply stays parked until `release`: a caller
        interrupted before it recorded what the reply says can wait for it
        again. Raises CoordinatorError when the connection is lost first.
        """
        if not self.may_have_sent(request_id):
            raise ValueError(f"request {request_id} was never sent: no reply will come")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self._parked.get(request_id)
            if reply is not None:
                return reply
            if not self._receive(deadline):
                return None

    def release(self, request_id: int) -> None:
        """Forget the reply to `request_id`: its caller has recorded it."""
        self._parked.pop(request_id, None)

    def wait_push(self, timeout: float | None = None) -> list[Any] | None:
        """The next message the coordinator sent unasked, waiting up to `timeout`; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.pushes:
            if not self._receive(deadline):
                return None
        return self.pushes.popleft()

    def peer_alive(self) -> bool:
        """False if the coordinator has closed its end (it stopped or died); files what has arrived meanwhile."""
        try:
            while not self.broken and self._poll.poll(0):
                self._receive(deadline=0.0)
        except (OSError, ProtoBaseError):
            return False
        return not self.broken

    def _receive(self, deadline: float | None) -> bool:
        """Wait until bytes arrive (or `deadline`), read and file them; False if the deadline passed."""
        if self.broken:
            raise CoordinatorError("this connection to the coordinator is closed")
        # Wait where an interruption costs nothing: no byte has been taken off the socket yet.
        within = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._busy.wait(
            lambda: self._poll.poll(0), lambda: self._poll.poll(_milliseconds_left(deadline)), within
        ):
            return False
        self._settled = False  # until what recv_into returns is filed
        try:
            received = self._sock.recv_into(self._chunk)
        except OSError as error:
            self._closed = True
            raise CoordinatorError(f"the connection to the coordinator failed: {error.strerror}") from None
        if not received:
            self._closed = True
            self._raise_refusal()
            raise CoordinatorError("the coordinator closed the connection")
        for body in self._reader.feed_bodies(memoryview(self._chunk)[:received]):
            self._file(body)
        self._settled = True
        return True

    def _raise_refusal(self) -> None:
        """Raise the error the coordinator sent unasked before it hung up (it refused us), if it did.

        Reads what is left on the socket without waiting: a refusal is
        written before the close.
        """
        try:
            while True:
                data = self._sock.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
                if not data:
                    break
                for body in self._reader.feed_bodies(data):
                    self._file(body)
        except (OSError, ProtoBaseError):
            pass
        for push in self.pushes:
            if push and push[0] == "error":
                raise Refusal(error_from_reply(push))

    def _file(self, body: Body) -> None:
        try:
            message = codec.decode(body, frozen=False)
        except CorruptionError as error:
            raise ProtocolError(f"the coordinator sent an undecodable message ({error})") from None
        if not isinstance(message, list) or len(message) < 2 or type(message[0]) is not int:
            raise ProtocolError(f"the coordinator sent a message without a request id: {message!r:.80}")
        if message[0] == PUSH:
            self.pushes.append(message[1:])
            return
        if len(self._parked) >= MAX_PARKED:
            del self._parked[next(iter(self._parked))]
        self._parked[message[0]] = message[1:]

    def close(self) -> None:
        self._closed = True
        self._sock.close()
