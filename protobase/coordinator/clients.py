"""The coordinator's connected clients: who is connected, what each has half-sent, whom to answer.

Owns the table of client connections (one `Client` per accepted socket), the
bytes of incomplete requests held for them and the bounds on those bytes, the
sending of replies and watch notifications, and hanging up. Runs in the
coordinator process, inside its single-threaded event loop (server.py), which
accepts the connections and reads their bytes; nothing here blocks but a
reply to a client that stopped reading, and that only for the send timeout of
wire/framing.py.

Whatever a client sends is untrusted: a client that would make us hold more
than `max_buffered_bytes` of incomplete requests (all clients together), or
that leaves a request half-sent for `partial_frame_timeout` seconds, is hung
up on; nothing it sends stops the coordinator.

Invariants: `buffered_bytes` is the sum of the bytes every connected client's
frame reader holds; a client is in `clients` exactly while its socket is open
and registered with the selector; a client that leaves gives back its reader
slot.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protobase.coordinator.conflicts import KeyPath
from protobase.errors import ProtocolError
from protobase.wire.framing import Body, FrameReader, send
from protobase.wire.verbs import PUSH

__all__ = ["Client", "Asker", "Connections"]

log = logging.getLogger("protobase.coordinator")


class Client:
    """One connected client process."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid  # from SO_PEERCRED
        self.reader = FrameReader()
        self.partial_since = 0.0  # time.monotonic() when its incomplete request began
        self.slot: int | None = None  # reader-table slot, once it said hello
        self.watching: list[KeyPath] | None = None  # key-path prefixes it watches, if it is a watcher


@dataclass(frozen=True)
class Asker:
    """Whom to answer: a client, and the id of its request (PUSH for what we send unasked)."""

    client: Client
    request_id: int


class Connections:
    """The connected clients, their incomplete requests and their replies."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        release_slot: Callable[[int], None],
        *,
        max_buffered_bytes: int,
        partial_frame_timeout: float,
    ) -> None:
        self.selector = selector  # the event loop's: a client's socket is registered while it is connected
        self.release_slot = release_slot  # gives back the reader-table slot of a client that leaves
        self.max_buffered_bytes = max_buffered_bytes  # bound on incomplete requests held for all clients
        self.partial_frame_timeout = partial_frame_timeout  # seconds a request may stay half-sent
        self.clients: dict[socket.socket, Client] = {}  # {connection -> client}
        self.buffered_bytes = 0  # bytes of incomplete requests held for all clients
        self.accepted = 0  # connections accepted since start: the grace only counts once one came
        self.idle_since: float | None = time.monotonic()  # since when no client is connected; None: one is

    def add(self, sock: socket.socket, pid: int) -> Client:
        """Serve a connection just accepted from process `pid` (non-blocking, its peer checked)."""
        client = Client(sock, pid)
        self.clients[sock] = client
        self.selector.register(sock, selectors.EVENT_READ)
        self.idle_since = None
        self.accepted += 1
        return client

    def take_frames(self, client: Client, data: memoryview) -> list[Body]:
        """The frames `data` completes; ProtocolError if buffering the rest would pass our memory bounds."""
        before = client.reader.buffered
        try:
            bodies = client.reader.feed_bodies(data)
        finally:
            self.buffered_bytes += client.reader.buffered - before
        if client.reader.buffered and not before:
            client.partial_since = time.monotonic()
        if self.buffered_bytes > self.max_buffered_bytes and client.reader.buffered:
            raise ProtocolError(
                f"the coordinator holds {self.buffered_bytes} bytes of incomplete requests, over its "
                f"{self.max_buffered_bytes}-byte bound; send smaller commits (split the transaction)"
            )
        return bodies

    def answer(self, asker: Asker | None, reply: list[Any] | None) -> None:
        """Send `reply` to `asker`, if both are there and it is still connected; hang up if it cannot take it."""
        if asker is None or reply is None or asker.client.sock not in self.clients:
            return
        try:
            send(asker.client.sock, [asker.request_id, *reply])
        except OSError:
            self.drop(asker.client.sock)

    def notify(self, seq: int, paths: Sequence[KeyPath]) -> None:
        """Tell every watcher whose prefixes a published commit touched."""
        for client in list(self.clients.values()):
            if client.watching is None or not paths:
                continue
            touched = [
                list(path)
                for path in paths
                if any(path[: len(prefix)] == prefix or prefix[: len(path)] == path for prefix in client.watching)
            ]
            if touched:
                self.answer(Asker(client, PUSH), ["changed", seq, touched])

    def drop(self, sock: socket.socket) -> None:
        """Hang up on a client (if still connected) and give back what it held."""
        client = self.clients.pop(sock, None)
        if client is None:
            return
        self.buffered_bytes -= client.reader.buffered
        self.selector.unregister(sock)
        sock.close()
        if client.slot is not None:
            self.release_slot(client.slot)
        if not self.clients:
            self.idle_since = time.monotonic()

    def drop_all(self) -> None:
        """Hang up on every client (a stopping coordinator)."""
        for sock in list(self.clients):
            self.drop(sock)

    def drop_stalled_senders(self) -> None:
        """Hang up on clients that left a request half-sent for too long: they hold our memory."""
        now = time.monotonic()
        for client in list(self.clients.values()):
            if client.reader.buffered and now - client.partial_since > self.partial_frame_timeout:
                log.warning(
                    "closing the connection of client %d: it left %d bytes of a request unfinished for %ss",
                    client.pid,
                    client.reader.buffered,
                    self.partial_frame_timeout,
                )
                self.drop(client.sock)

    def __len__(self) -> int:
        return len(self.clients)
