"""The coordinator's client connections (coordinator/clients.py), on socket pairs.

`Connections` keeps what every client half-sent within `max_buffered_bytes`
(all clients together), hangs up on a client that leaves a request
half-sent past `partial_frame_timeout`, gives back the reader slot of a
client that leaves, and sends watchers only the changes under their
prefixes. Replies are read back from the other end of each pair.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from protobase.coordinator.clients import Asker, Client, Connections
from protobase.errors import ProtocolError
from protobase.wire.framing import FrameReader, encode_frame
from protobase.wire.verbs import PUSH

LENGTH = struct.Struct("<I")


class Table:
    """A Connections, its selector, the slots it gave back, and the client end of each connection."""

    def __init__(self, max_buffered_bytes: int = 1 << 20, partial_frame_timeout: float = 30.0) -> None:
        self.selector = selectors.DefaultSelector()
        self.released: list[int] = []
        self.connections = Connections(
            self.selector,
            self.released.append,
            max_buffered_bytes=max_buffered_bytes,
            partial_frame_timeout=partial_frame_timeout,
        )
        self.peers: list[socket.socket] = []

    def connect(self, pid: int = 100) -> tuple[Client, socket.socket]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(10)
        self.peers.append(theirs)
        return self.connections.add(ours, pid), theirs

    def close(self) -> None:
        self.connections.drop_all()
        for peer in self.peers:
            peer.close()
        self.selector.close()


@pytest.fixture
def table() -> Iterator[Any]:
    made: list[Table] = []

    def build(**options: Any) -> Table:
        made.append(Table(**options))
        return made[-1]

    yield build
    for each in made:
        each.close()


def received(peer: socket.socket) -> list[Any]:
    """Every message the coordinator's end sent so far (its socket may be closed)."""
    reader, messages = FrameReader(), []
    peer.settimeout(0.5)
    try:
        while data := peer.recv(1 << 16):
            messages.extend(reader.feed(data))
    except TimeoutError:
        pass
    return messages


def test_a_connection_is_registered_counted_and_ends_the_idle_time(table):
    tables = table()
    assert tables.connections.idle_since is not None and len(tables.connections) == 0
    client, _ = tables.connect(pid=42)
    assert (client.pid, client.slot, client.watching) == (42, None, None)
    assert tables.selector.get_key(client.sock).events == selectors.EVENT_READ
    assert (len(tables.connections), tables.connections.accepted, tables.connections.idle_since) == (1, 1, None)


def test_frames_complete_across_reads_and_the_rest_is_counted_as_buffered(table):
    tables = table()
    client, _ = tables.connect()
    frame = encode_frame([1, "stats"])
    assert tables.connections.take_frames(client, memoryview(frame + frame[:3])) == [frame[4:]]
    assert tables.connections.buffered_bytes == client.reader.buffered == 3
    assert tables.connections.take_frames(client, memoryview(frame[3:])) == [frame[4:]]
    assert tables.connections.buffered_bytes == 0


def test_incomplete_requests_over_the_bound_for_all_clients_are_refused(table):
    tables = table(max_buffered_bytes=1000)
    first, _ = tables.connect()
    second, _ = tables.connect()
    tables.connections.take_frames(first, memoryview(LENGTH.pack(5000) + b"x" * 596))  # 600 bytes held
    with pytest.raises(
        ProtocolError,
        match=r"^the coordinator holds 1100 bytes of incomplete requests, over its "
        r"1000-byte bound; send smaller commits \(split the transaction\)$",
    ):
        tables.connections.take_frames(second, memoryview(LENGTH.pack(5000) + b"x" * 496))
    tables.connections.drop(second.sock)  # what the server does next: its bytes are no longer held
    assert tables.connections.buffered_bytes == 600
    tables.connections.take_frames(first, memoryview(b"x" * 300))  # that client alone stays within the bound
    assert tables.connections.buffered_bytes == 900


def test_dropping_a_client_frees_its_slot_unregisters_it_and_starts_the_idle_time(table):
    tables = table()
    client, peer = tables.connect()
    client.slot = 7
    other, _ = tables.connect()
    tables.connections.drop(client.sock)
    tables.connections.drop(client.sock)  # twice: nothing more happens
    assert tables.released == [7] and client.sock.fileno() == -1
    assert tables.connections.idle_since is None and list(tables.connections.clients) == [other.sock]
    assert peer.recv(1) == b""  # hung up
    tables.connections.drop(other.sock)
    assert tables.released == [7] and tables.connections.idle_since is not None


def test_a_client_that_leaves_a_request_half_sent_too_long_is_hung_up_on(table, caplog):
    tables = table(partial_frame_timeout=0.0)
    stalled, stalled_peer = tables.connect(pid=11)
    done, _ = tables.connect(pid=12)
    tables.connections.take_frames(stalled, memoryview(LENGTH.pack(100) + b"x" * 10))
    tables.connections.take_frames(done, memoryview(encode_frame([1, "stats"])))
    with caplog.at_level(logging.WARNING, logger="protobase.coordinator"):
        tables.connections.drop_stalled_senders()
    assert list(tables.connections.clients) == [done.sock]
    assert [record.getMessage() for record in caplog.records] == [
        "closing the connection of client 11: it left 14 bytes of a request unfinished for 0.0s"
    ]
    assert stalled_peer.recv(1) == b"" and tables.connections.buffered_bytes == 0


def test_watchers_are_sent_only_the_changed_paths_under_their_prefixes(table):
    tables = table()
    users, users_peer = tables.connect()
    alice, alice_peer = tables.connect()
    _, bystander_peer = tables.connect()
    users.watching = [("users",)]
    alice.watching = [("users", "alice", "city")]
    tables.connections.notify(5, [("users", "bob"), ("orders", 1)])
    tables.connections.notify(6, [("users",)])  # the whole dict replaced: under every users prefix
    tables.connections.notify(7, [])
    assert received(users_peer) == [[PUSH, "changed", 5, [["users", "bob"]]], [PUSH, "changed", 6, [["users"]]]]
    assert received(alice_peer) == [[PUSH, "changed", 6, [["users"]]]]
    assert received(bystander_peer) == []


def test_an_answer_goes_to_its_request_id_and_one_that_cannot_be_sent_drops_the_client(table):
    tables = table()
    client, peer = tables.connect()
    tables.connections.answer(Asker(client, 9), ["ok", 1])
    tables.connections.answer(None, ["ok", 2])  # a compaction's: nobody to answer
    tables.connections.answer(Asker(client, 10), None)  # answered later
    assert received(peer) == [[9, "ok", 1]]
    peer.close()
    tables.connections.answer(Asker(client, 11), ["ok", 3])
    assert client.sock not in tables.connections.clients
    tables.connections.answer(Asker(client, 12), ["ok", 4])  # gone already: nothing happens
