"""The commit ring: records arrive whole and in order, whatever their size; a lost beginning is refused."""

from __future__ import annotations

import os
import random

import pytest

from protobase.errors import CorruptionError
from protobase.shm import names
from protobase.shm.ring import CONTROL, SYNC, CommitRing

RECORD_HEADER = 16  # length, flags, lsn (ring.py's _RECORD)


@pytest.fixture
def ring_name():
    instance = names.new_instance_id()
    yield names.segment_name(instance, "ring")
    names.sweep(instance)


def test_random_records_arrive_whole_and_in_order_even_larger_than_the_ring_and_given_as_parts(ring_name):
    rng = random.Random(7)
    producer = CommitRing.create(ring_name, 8192)
    consumer = CommitRing.attach(ring_name)
    sent, received = [], []

    def drain(limit: int = 1 << 30) -> None:
        records, tail = consumer.read(limit)
        for lsn, flags, payload in records:
            if isinstance(payload, list):  # it came in fragments, handed over as they are, never joined
                assert len(payload) > 1 and all(len(part) <= producer.max_fragment for part in payload)
                payload = b"".join(payload)
            else:
                assert len(payload) <= producer.max_fragment
            received.append((lsn, flags, payload))
        consumer.release(tail)

    try:
        for lsn in range(1, 400):
            size = rng.choice([0, 10, 500, 3000, 20_000])  # 20 kB: more than twice the ring
            record = (lsn, rng.choice([0, SYNC, CONTROL]), os.urandom(size))
            if rng.random() < 0.5:  # as parts (a WAL record: its header, then the ops), some empty
                cuts = sorted(rng.randrange(size + 1) for _ in range(rng.randrange(4)))
                parts = [record[2][start:end] for start, end in zip([0, *cuts], [*cuts, size])]
                producer.append(record[0], record[1], parts, wait=drain)
            else:
                producer.append(*record, wait=drain)  # a full ring waits for the consumer
            sent.append(record)
            if rng.random() < 0.3:
                drain(rng.randrange(1, 20_000))
        drain()
        assert received == sent
        assert producer.head == producer.tail
    finally:
        producer.unlink()
        producer.close()
        consumer.close()


def test_parts_that_fit_one_fragment_are_written_as_one_record(ring_name):
    producer = CommitRing.create(ring_name, 8192)
    consumer = CommitRing.attach(ring_name)
    try:
        assert producer.append(1, SYNC, [b"header", b"", b"x" * 90]) == 96  # a commit's WAL record: header, ops
        assert producer.head == (RECORD_HEADER + 96 + 7) & ~7  # one record, no fragment header more
        records, tail = consumer.read()
        assert [tuple(record) for record in records] == [(1, SYNC, b"header" + b"x" * 90)]
        consumer.release(tail)
    finally:
        producer.unlink()
        producer.close()
        consumer.close()


def test_a_consumer_starting_inside_a_large_record_refuses_it(ring_name):
    producer = CommitRing.create(ring_name, 8192)
    first = CommitRing.attach(ring_name)
    successor = CommitRing.attach(ring_name)
    try:

        def first_reads_a_little() -> None:
            _, tail = first.read()  # copies fragments out, then "dies" holding them
            first.release(tail)

        producer.append(1, SYNC, os.urandom(20_000), wait=first_reads_a_little)
        with pytest.raises(CorruptionError, match="arrived without its beginning"):
            successor.read()
    finally:
        producer.unlink()
        producer.close()
        first.close()
        successor.close()
