"""Frames (wire/framing.py): a length, then one message; bounded, reassembled from any split."""

from __future__ import annotations

import os
import socket

import pytest

from protobase.core import codec
from protobase.errors import ProtocolError
from protobase.wire.framing import LARGE_BODY, LENGTH, FrameReader, encode_frame, frame_pieces, peer_credentials, send


def test_a_frame_is_its_body_length_then_its_body():
    frame = encode_frame([1, "hello", 3])
    (length,) = LENGTH.unpack_from(frame)
    assert length == len(frame) - LENGTH.size > 0


def test_a_frame_reader_keeps_only_the_incomplete_frame():
    reader = FrameReader()
    frames = b"".join(encode_frame([i, "ok"]) for i in range(3))
    assert reader.feed(frames[:-2]) == [[0, "ok"], [1, "ok"]]
    assert reader.buffered == len(encode_frame([2, "ok"])) - 2
    assert reader.feed(frames[-2:]) == [[2, "ok"]] and reader.buffered == 0


def test_frames_fed_a_byte_at_a_time_come_out_whole_and_in_order():
    reader = FrameReader()
    messages = [[i, "x" * i, {"k": i}] for i in range(20)]
    stream = b"".join(encode_frame(message) for message in messages)
    received = []
    for offset in range(len(stream)):
        received += reader.feed(stream[offset : offset + 1])
    assert received == messages and reader.buffered == 0


def test_a_frame_announcing_more_than_the_limit_is_refused_before_its_body_arrives():
    reader = FrameReader(max_frame=100)
    assert reader.feed_bodies(LENGTH.pack(100) + b"\x00" * 10) == []  # at the limit: waits for the rest
    with pytest.raises(ProtocolError, match="peer sent a frame of 101 bytes, over the 100-byte limit"):
        FrameReader(max_frame=100).feed_bodies(LENGTH.pack(101))


def test_bodies_are_handed_over_undecoded():
    body = encode_frame("not decoded")[LENGTH.size :]
    assert FrameReader().feed_bodies(LENGTH.pack(len(body)) + body) == [body]


@pytest.mark.parametrize("items", [1, 15, 16, 300])
def test_the_pieces_of_a_frame_with_a_large_bytes_item_join_into_its_frame(items):
    large = os.urandom(LARGE_BODY)
    message = [7, "commit", *range(items), large, [["a", 1]]]
    pieces = frame_pieces(message)
    assert b"".join(pieces) == encode_frame(message)
    assert len(pieces) == 3 and pieces[1] is large  # sent from where it is, between what comes before and after


def test_a_frame_without_a_large_bytes_item_is_one_piece():
    message = [7, "commit", os.urandom(LARGE_BODY - 1)]
    assert frame_pieces(message) == [encode_frame(message)]


def test_a_large_body_is_received_into_its_own_buffer_across_any_split():
    large, small = [1, os.urandom(LARGE_BODY)], [2, "ok"]
    stream = encode_frame(small) + encode_frame(large) + encode_frame(small)
    in_header = len(encode_frame(small)) + 2
    # (cuts, how the large body comes out): one that arrives whole in one read is simply copied out
    splits = [([in_header, in_header + 1000], memoryview), ([in_header + 100_000], memoryview)]
    for cuts, kind in [*splits, ([len(stream) - 3], bytes)]:
        reader, received, start = FrameReader(), [], 0
        for end in [*cuts, len(stream)]:
            bodies = reader.feed_bodies(stream[start:end])
            received += [(type(body), codec.decode(body, frozen=False)) for body in bodies]
            assert len(reader.buffer) < 1000  # the large body never sits in the growing buffer
            start = end
        assert received == [(bytes, small), (kind, large), (bytes, small)] and reader.buffered == 0


def test_a_large_body_counts_as_buffered_only_as_far_as_it_arrived():
    reader = FrameReader()
    assert reader.feed_bodies(LENGTH.pack(10 * LARGE_BODY) + b"\x00" * 1000) == []
    assert reader.buffered == 1000  # its mapping is paged in as it is filled


def test_send_on_a_non_blocking_socket_gives_up_on_a_peer_that_reads_nothing():
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        with pytest.raises(TimeoutError, match="the peer read nothing for 0.2s"):
            for _ in range(10_000):  # far more than the socket buffers hold
                send(ours, "x" * 65536, stall_timeout=0.2)
    finally:
        ours.close()
        theirs.close()


def test_send_delivers_a_whole_message_that_the_peer_reads_back():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        send(ours, [7, "ok", b"\x00" * 100_000])
        reader, received = FrameReader(), []
        while not received:
            received = reader.feed(theirs.recv(1 << 16))
        assert received == [[7, "ok", b"\x00" * 100_000]]


def test_peer_credentials_name_the_process_at_the_other_end():
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        pid, uid, _gid = peer_credentials(ours)
        assert (pid, uid) == (os.getpid(), os.getuid())
