"""client/writeset.py: one op per path in the order of last writes, reads, state, and the checks at assignment."""

from __future__ import annotations

import pytest

from protobase.client.writeset import WriteSet, index_name, validate
from protobase.errors import DatabaseClosedError, EncodingError
from protobase.wire.opcodes import OP_CREATE_INDEX, OP_DELETE, OP_SET


def test_the_last_write_of_a_path_wins_and_moves_to_the_end():
    writes = WriteSet(serializable=False)
    writes.record(("a",), OP_SET, 1)
    writes.record(("b",), OP_SET, 2)
    writes.record(("a",), OP_DELETE, None)
    assert writes.wire_ops() == [[OP_SET, ["b"], 2], [OP_DELETE, ["a"], None]]
    assert len(writes) == 2


def test_deferred_ops_are_collected_at_commit_in_their_place():
    writes = WriteSet(serializable=False)
    elements = [["element op"]]
    writes.record(("a",), OP_SET, 1)
    writes.record_deferred(("big",), lambda: list(elements))
    elements.append(["another"])  # changes after recording still count: collected when asked
    assert writes.wire_ops() == [[OP_SET, ["a"], 1], ["element op"], ["another"]]


def test_index_ops_are_kept_apart_from_the_collection_s_own_write():
    writes = WriteSet(serializable=False)
    writes.record(("users",), OP_SET, {})
    writes.record_index_op(("users",), OP_CREATE_INDEX, "city")
    assert writes.wire_ops() == [[OP_SET, ["users"], {}], [OP_CREATE_INDEX, ["users"], "city"]]


def test_the_root_cannot_be_indexed():
    with pytest.raises(ValueError, match="the root itself cannot be indexed"):
        WriteSet(serializable=False).record_index_op((), OP_CREATE_INDEX, "city")


def test_keys_written_below_a_mapping_count_writes_inside_its_records_but_not_index_ops():
    writes = WriteSet(serializable=False)
    writes.record(("users", "alice", "city"), OP_SET, "Paris")
    writes.record(("users", "bob"), OP_DELETE, None)
    writes.record(("carts", "u1"), OP_SET, [])
    writes.record_index_op(("users",), OP_CREATE_INDEX, "city")
    assert writes.keys_written_below(("users",)) == {"alice", "bob"}
    assert writes.keys_written_below(()) == {"users", "carts"}


def test_the_sets_of_an_update_are_one_entry_listed_in_its_place():
    writes = WriteSet(serializable=False)
    writes.record(("users", "a"), OP_SET, 0)
    writes.record_sets(("users",), {"a": 1, "b": 2})
    writes.record(("users", "b"), OP_SET, 3)
    writes.record_sets(("users",), {"c": 4})
    writes.record(("other", "x"), OP_SET, 5)
    assert writes.wire_ops() == [
        [OP_SET, ["users", "a"], 0],
        [OP_SET, ["users", "a"], 1],
        [OP_SET, ["users", "b"], 2],
        [OP_SET, ["users", "b"], 3],
        [OP_SET, ["users", "c"], 4],
        [OP_SET, ["other", "x"], 5],
    ]
    assert writes.keys_written_below(("users",)) == {"a", "b", "c"}
    assert writes.keys_written_below(()) == {"users", "other"}
    writes.state = "committed"
    writes.release()
    assert writes.keys_written_below(()) == {"users", "other"}
    assert writes.keys_written_below(("users",)) == {"a", "b"}  # an update's keys went with its values


def test_reads_are_kept_only_when_serializable():
    snapshot, serializable = WriteSet(serializable=False), WriteSet(serializable=True)
    for writes in (snapshot, serializable):
        writes.read(("users", "alice"))
    assert snapshot.reads == set() and serializable.reads == {("users", "alice")}


@pytest.mark.parametrize("state", ["committed", "aborted", "unknown"])
def test_an_ended_transaction_refuses_writes_naming_its_state(state):
    writes = WriteSet(serializable=False)
    writes.state = state
    with pytest.raises(DatabaseClosedError, match=f"this transaction is {state}; start a new one"):
        writes.record(("a",), OP_SET, 1)


def test_a_committing_transaction_still_reads_its_own_values():
    writes = WriteSet(serializable=False)
    writes.state = "committing"
    writes.check_active()


def test_validate_names_the_path_of_a_bad_value_or_key():
    with pytest.raises(EncodingError, match=r"root\['a'\]\['b'\]"):
        validate({"b": object()}, ("a",))
    with pytest.raises(EncodingError, match=r"cannot use NaN as a key at root\['a'\]\['b'\]"):
        validate({"b": {float("nan"): 1}}, ("a",))  # the codec stores it; a stored dict's key must order
    validate({"b": [1, {"c": {2, 3}}]}, ("a",))


def test_index_names_are_one_field_or_a_tuple_of_fields():
    assert index_name(("city",)) == "city"
    assert index_name(("city", "score")) == ("city", "score")
    with pytest.raises(TypeError, match="needs at least one field name"):
        index_name(())
    with pytest.raises(TypeError, match="index fields are dotted names"):
        index_name((3,))
