"""Frames (wire/framing.py): a length, then one message; bounded, reassembled from any split."""

from __future__ import annotations

import os
import socket

import pytest

from protobase.errors import ProtocolError
from protobase.wire.framing import LENGTH, FrameReader, encode_frame, peer_credentials, send


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
