"""The compiled core (protobase/core/ccodec.c) against its pure-Python oracles (codec.py, frozen.py).

Byte identity on generated values, the same decoded values (types included)
on generated encodings, and on damaged bytes the compiled decoder either
refuses them or agrees with the oracle: it never accepts what it cannot read
and never crashes the process. `storable` (the fast path of a client's
checks) only vouches for what the Python checks accept; `freeze` copies as
frozen.freeze_python does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protobase import native
from protobase.client import writeset
from protobase.core import codec
from protobase.core import frozen as frozen_module
from protobase.core.frozen import FrozenDict, FrozenList, FrozenSet
from protobase.errors import CorruptionError, EncodingError

if codec.COMPILED:
    from protobase.core import ccodec
needs_compiled = pytest.mark.skipif(not codec.COMPILED, reason="the compiled core is not loaded (see the test below)")

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 80), max_value=1 << 80),
    st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, -32, -33, -128, -129, -32768, -32769, 1 << 63, -(1 << 63)]),
    st.sampled_from([(1 << 32) - 1, 1 << 32, (1 << 64) - 1, 1 << 64, -(1 << 31), -(1 << 31) - 1]),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.text(min_size=250, max_size=300),
    st.binary(max_size=40),
    st.sampled_from([b"x" * 255, b"x" * 256, b"y" * 70000, "z" * 70000, "é" * 20]),
    st.datetimes(),
    st.dates(),
    st.decimals(allow_nan=False),
    st.uuids(),
    st.builds(codec.Ref, st.integers(min_value=0, max_value=(1 << 60) - 1), st.integers(min_value=0, max_value=15)),
)
hashable = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10), st.binary(max_size=5)),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=20),
        st.dictionaries(hashable, children, max_size=20),
        st.lists(children, max_size=5).map(tuple),
        st.sets(hashable, max_size=8),
        st.frozensets(hashable, max_size=8),
        st.lists(children, max_size=5).map(FrozenList),
        st.dictionaries(st.text(max_size=5), children, max_size=5).map(FrozenDict),
        st.sets(hashable, max_size=5).map(FrozenSet),
    )


values = st.recursive(scalars, containers, max_leaves=60)


def typed(value: Any) -> Any:
    """`value` as a tree that compares types too (1, 1.0 and True differ; so do list and FrozenList)."""
    if isinstance(value, dict):
        return (type(value), sorted((repr(typed(k)), typed(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value), [typed(item) for item in value])
    if isinstance(value, (set, frozenset)):
        return (type(value), sorted(repr(typed(item)) for item in value))
    if isinstance(value, float) and math.isnan(value):
        return (float, "nan")
    if isinstance(value, codec.Ref):
        return (codec.Ref, value.ptr, value.kind)
    if isinstance(value, codec.Packed):
        return (codec.Packed, value.payload)
    return (type(value), value)


def test_the_compiled_core_is_built() -> None:
    if native.PURE_PYTHON:
        pytest.skip("PROTOBASE_PURE_PYTHON=1 chose the pure-Python modules")
    assert codec.COMPILED, f"protobase.core.ccodec is not built: {native.BUILD_HINT}"


@needs_compiled
@SETTINGS
@given(values)
def test_compiled_pack_writes_the_bytes_of_the_oracle(value: Any) -> None:
    assert ccodec.pack(value) == codec.pack_python(value)


@needs_compiled
@SETTINGS
@given(values, st.booleans())
def test_compiled_unpack_reads_what_the_oracle_reads(value: Any, frozen: bool) -> None:
    data = codec.pack_python(value)
    expected = codec.unpack_python(data, frozen, None, False)
    assert typed(codec.unpack(data, frozen, None, False)) == typed(expected)
    assert typed(codec.unpack(memoryview(data), frozen, None, False)) == typed(expected)


@needs_compiled
@SETTINGS
@given(values, st.data())
def test_damaged_bytes_are_refused_or_read_as_the_oracle_reads_them(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(codec.pack_python([value, value]))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    if data.draw(st.booleans()):
        damaged = bytes(encoded[:cut])  # truncated
    else:
        encoded[min(cut, len(encoded) - 1)] = data.draw(st.integers(min_value=0, max_value=255))
        damaged = bytes(encoded)
    try:
        compiled = codec.decode(damaged)
    except (CorruptionError, EncodingError):
        return  # refusing is always allowed: a stricter reader never stores what it misread
    assert typed(compiled) == typed(codec.unpack_python(damaged, True, None, False))


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items in 5 bytes
        b"\xdf\xff\xff\xff\xff\x01",  # a map likewise
        b"\xc6\xff\xff\xff\xff",  # bin longer than the buffer
        b"\xdb\x00\x00\x00\x05ab",  # str longer than the buffer
        b"\xc1",  # the byte msgpack never uses
        b"\x91" * 5000 + b"\xc0",  # nesting far past any stored value
        b"\xd7\x01" + b"\x00" * 7,  # a Ref cut short
        b"\xd6\x01\x00\x00\x00\x00",  # a Ref of 4 bytes
        b"\xd4\x02\x05",  # a tuple whose payload is not an array
        b"\xc7\x02\x02\x90\xc0",  # a tuple with bytes after its array
        b"\x81\x90\xc0",  # an unhashable map key
        b"\xa2\xff\xfe",  # text that is not UTF-8
        b"\xc0\xc0",  # bytes after the value
        b"",
    ],
)
def test_malformed_bytes_are_a_corruption_error(data: bytes) -> None:
    with pytest.raises(CorruptionError):
        codec.decode(data)


def test_a_ref_decodes_through_the_callers_function() -> None:
    data = codec.pack([codec.Ref(0x1234, 5), codec.Ref((1 << 60) - 1, 15)])
    assert codec.decode(data, ref=lambda ptr, kind: ("ref", ptr, kind)) == [
        ("ref", 0x1234, 5),
        ("ref", (1 << 60) - 1, 15),
    ]


def test_rare_types_round_trip_through_the_python_hooks() -> None:
    value = {
        "when": dt.datetime(2026, 12, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2026, 12, 2),
        "price": Decimal("-1.50"),
        "id": uuid.UUID(int=7),
        "big": -(1 << 100),
    }
    data = codec.pack(value)
    assert data == codec.pack_python(value)
    assert codec.decode(data, frozen=False) == value


def test_what_neither_can_encode_is_an_encoding_error_naming_the_path() -> None:
    with pytest.raises(EncodingError, match=r"type object at root\['x'\]\[1\]"):
        codec.encode({"x": [1, object()]})
    with pytest.raises(EncodingError, match="Unicode"):
        codec.encode(["\ud800"])


@needs_compiled
def test_the_pure_python_switch_is_inherited_by_child_processes() -> None:
    import subprocess
    import sys

    probe = "from protobase.core import codec; print(codec.COMPILED)"
    environment = dict(os.environ, PROTOBASE_PURE_PYTHON="1")
    pure = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    environment.pop("PROTOBASE_PURE_PYTHON")
    built = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    assert (pure.stdout.strip(), built.stdout.strip()) == ("False", "True")
    assert pure.stderr == built.stderr == ""  # choosing the fallback on purpose warns of nothing


def accepted_by_python(value: Any, path: tuple[Any, ...]) -> bool:
    """Whether the pure-Python checks of a client's write (codec.validate and the key checks) accept `value`."""
    try:
        validate_python(value, path)
    except EncodingError:
        return False
    return True


def validate_python(value: Any, path: tuple[Any, ...]) -> None:
    codec.validate(value, path)
    writeset.check_keys(value, path)


@needs_compiled
@SETTINGS
@given(values, st.integers(min_value=0, max_value=100))
def test_storable_only_vouches_for_what_the_python_checks_accept(value: Any, depth: int) -> None:
    path = ("k",) * depth
    if ccodec.storable(value, depth):
        assert accepted_by_python(value, path)


@needs_compiled
@pytest.mark.parametrize(
    "value",
    [
        {"id": 5, "name": "Zoë", "tags": ["a", "b"], "at": dt.datetime(2026, 1, 1), "score": 1.5},
        {(1, "a"): {2, 3.5, "x", (None, b"y")}, None: [uuid.UUID(int=1), dt.date(2026, 1, 1), Decimal("1.5")]},
        [[[[[]]]]],
        {"ok": frozenset({1, 2}), "also": FrozenDict(a=FrozenList([1]))},
    ],
)
def test_storable_vouches_for_plain_data(value: Any) -> None:
    assert ccodec.storable(value, 2)
    assert accepted_by_python(value, ("users", "k"))


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


looped: list[Any] = []
looped.append(looped)


@needs_compiled
@pytest.mark.parametrize(
    "value",
    [
        ["\ud800"],  # a lone surrogate
        {float("nan"): 1},  # a key that is not equal to itself
        {Decimal("1"): 1},  # Decimal keys: Python decides (a NaN is refused)
        {"x": {frozenset({1})}},  # a set element that is not a key type
        {"x": {b"a": object()}},  # a type nobody stores
        nested(200),  # deeper than MAX_DEPTH
        looped,  # a list that holds itself
        {"x": codec.Ref(1, 1)},  # internal references: the Python checks decide
    ],
)
def test_storable_leaves_the_doubtful_to_the_python_checks(value: Any) -> None:
    assert not ccodec.storable(value, 2)


@needs_compiled
@SETTINGS
@given(values)
def test_compiled_freeze_copies_as_the_oracle_does(value: Any) -> None:
    assert typed(ccodec.freeze(value)) == typed(frozen_module.freeze_python(value))


@needs_compiled
def test_compiled_freeze_copies_deeply_and_hands_dataclasses_to_python() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: list[int]

    codec.register_dataclass(Point, name="tests.test_ccodec.Point")
    original = {"a": [1, {"b": {2}}], "p": Point(1, [2])}
    frozen = ccodec.freeze(original)
    original["a"][1]["b"].add(3)  # type: ignore[index, union-attr]
    original["p"].y.append(3)  # type: ignore[union-attr]
    assert type(frozen) is FrozenDict and type(frozen["a"]) is FrozenList and type(frozen["a"][1]["b"]) is FrozenSet
    assert frozen["a"][1]["b"] == {2} and list(frozen["p"].y) == [2]
    assert frozen == frozen_module.freeze_python({"a": [1, {"b": {2}}], "p": Point(1, [2])})


@needs_compiled
def test_frozen_containers_of_scalars_are_left_out_of_the_cyclic_collector() -> None:
    """A client caches thousands of records; walked by every full collection, they made its pauses long."""
    import gc

    atomic = {"id": 1, "name": "x", "tags": ["a", 2], "at": (1.5, None)}
    holding_a_set = {"id": 1, "roles": {"admin"}}
    decoded = codec.decode(codec.encode([atomic, holding_a_set]), frozen=True)
    for frozen in (ccodec.freeze(atomic), decoded[0]):
        assert type(frozen) is FrozenDict and not gc.is_tracked(frozen)
        assert not gc.is_tracked(frozen["tags"])
    for frozen in (ccodec.freeze(holding_a_set), decoded[1]):
        assert gc.is_tracked(frozen)  # a FrozenSet is tracked, so may be part of a cycle
    assert gc.is_tracked(decoded)  # it holds one such record
    assert ccodec.freeze(atomic) == frozen_module.freeze_python(atomic)


# -- plain records kept as their bytes (unpack's `records`, for the coordinator's decode_ops) ------

record_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 64), max_value=1 << 65),
    st.sampled_from([127, 128, 255, 256, 65535, 65536, -32, -33, -128, -129, -32768, -32769, (1 << 32) - 1, 1 << 32]),
    st.floats(),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=2),
)
records = st.dictionaries(st.text(max_size=6), record_values, max_size=8) | st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=3), st.integers(), min_size=60, max_size=70
)
commits = st.lists(
    st.tuples(
        st.just(1), st.lists(st.text(max_size=4), max_size=2), records | st.dictionaries(st.text(max_size=8), records)
    ).map(list),
    min_size=1,
    max_size=4,
)
limits = st.builds(
    codec.PlainRecords,
    st.integers(min_value=0, max_value=80),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=0, max_value=400),
)


def unpacked(value: Any) -> Any:
    """`value` with every Packed decoded, checking on the way that its payload is what pack writes for it."""
    if type(value) is codec.Packed:
        record = codec.unpack_python(value.payload, False, None, False)
        assert type(record) is dict and codec.pack_python(record) == value.payload
        return record
    if type(value) is dict:
        return {key: unpacked(item) for key, item in value.items()}
    if type(value) is list:
        return [unpacked(item) for item in value]
    return value


@needs_compiled
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commits, limits)
def test_compiled_unpack_keeps_the_records_the_oracle_keeps(ops: Any, records: codec.PlainRecords) -> None:
    data = codec.pack_python(ops)
    expected = codec.unpack_python(data, False, None, False, records)
    assert typed(codec.unpack(data, False, None, False, records)) == typed(expected)
    assert typed(unpacked(expected)) == typed(codec.unpack_python(data, False, None, False))


@needs_compiled
@pytest.mark.parametrize(
    "record, why",
    [
        (b"\x81\xa1a\xcc\x05", "5 as a uint 8"),
        (b"\x81\xa1a\xd0\x05", "5 as an int 8"),
        (b"\x81\xa1a\xd1\xff\x80", "-128 as an int 16"),
        (b"\x81\xa1a\xca\x3f\x80\x00\x00", "a float 32"),
        (b"\x81\xa1a\xd9\x01x", "a short text as a str 8"),
        (b"\x81\xd9\x01a\x01", "a short key as a str 8"),
        (b"\xde\x00\x01\xa1a\x01", "one entry in a map 16"),
        (b"\x82\xa1a\x01\xa1a\x02", "a key twice"),
        (b"\x81\xa1a\xa2\xc3\xa9", "text that is not ASCII"),
        (b"\x81\x01\x01", "a key that is not text"),
        (b"\x81\xa1a\x91\x01", "an array inside"),
    ],
)
def test_a_record_is_kept_as_its_bytes_only_if_they_are_what_pack_writes(record: bytes, why: str) -> None:
    # Not canonical, or not plain: the compiled core decodes it (the oracle packs what it decoded),
    # so a Packed's bytes are always those of the dict it stands for, whoever made them.
    data = b"\x91\x93\x01\x90" + record  # [[1, [], record]]
    records = codec.PlainRecords(64, 32, 16 << 10)
    value = codec.decode(data, frozen=False, records=records)
    assert type(value[0][2]) is dict, why
    assert unpacked(codec.unpack_python(data, False, None, False, records)) == value


@needs_compiled
@SETTINGS
@given(st.dictionaries(st.text(max_size=6), record_values, max_size=8), st.text(max_size=6))
def test_compiled_packed_get_reads_one_field_as_the_oracle_does(record: dict[str, Any], other: str) -> None:
    # An index build reads one field of each Packed record in its bytes (core/index.py); where the
    # compiled reader cannot tell (a shape decode never keeps), it says so and the caller decodes.
    missing, unknown = object(), object()
    payload = codec.pack_python(record)
    kept = type(codec.unpack(codec.pack_python([[1, [], record]]), False, None, False, LOOSE)[0][2]) is codec.Packed
    for key in [*record, other]:
        found = codec.packed_get(payload, key, missing, unknown)
        assert typed(codec.packed_get_python(payload, key, missing, unknown)) == typed(record.get(key, missing))
        if found is unknown:
            assert not (kept and key.isascii()), f"a kept record's field {key!r} was not read"
        elif found is not missing or key in record:
            assert typed(found) == typed(record[key])
        else:
            assert key not in record
    assert codec.packed_get(b"\x91\x01", "a", missing, unknown) is unknown  # not a map: the caller decodes


@needs_compiled
def test_compiled_packed_payloads_and_refs_give_what_the_oracle_gives() -> None:
    records = [codec.Packed(codec.pack_python({"n": i})) for i in range(5)]
    assert codec.packed_payloads(records) == codec.packed_payloads_python(records) == [r.payload for r in records]
    for mixed in ([*records, {"n": 5}], [None], [codec.Ref(8, 1)]):
        assert codec.packed_payloads(mixed) is None and codec.packed_payloads_python(mixed) is None
    assert codec.packed_payloads([]) == codec.packed_payloads_python([]) == []
    pointers = [8, 1 << 40, 96]
    assert codec.refs(pointers, 3) == codec.refs_python(pointers, 3) == [codec.Ref(p, 3) for p in pointers]
    with pytest.raises(TypeError, match="takes a list"):
        codec.packed_payloads(tuple(records))


def _map_of(pairs: list[tuple[Any, Any]]) -> bytes:
    """The msgpack map of `pairs` as given, duplicates and order kept (what a crafted client could send)."""
    return (
        b"\xde"
        + len(pairs).to_bytes(2, "big")
        + b"".join(codec.pack_python(k) + codec.pack_python(v) for k, v in pairs)
    )


def _op_setting(argument: bytes) -> bytes:
    return (
        codec.array_header(1) + codec.array_header(3) + codec.pack_python(1) + codec.pack_python(["users"]) + argument
    )


_BIG = codec.DATA_KEYS_ABOVE + 1
_IN_ORDER = [(f"k{i:04d}", {"n": i}) for i in range(_BIG)]


@needs_compiled
@pytest.mark.parametrize(
    "pairs, kind",
    [
        (_IN_ORDER, codec.SortedEntries),
        (_IN_ORDER[:-1], dict),  # not more than DATA_KEYS_ABOVE entries
        (_IN_ORDER[1:] + _IN_ORDER[:1], dict),  # a key out of order
        ([*_IN_ORDER, ("k0000", {"n": -1})], codec.SortedEntries),  # a duplicate: its dict is in order
        ([*_IN_ORDER[:-1], (7, {"n": 7})], dict),  # a key that is not text
        ([*_IN_ORDER[:2], ("k0001", {"n": -1}), *_IN_ORDER[2:]], codec.SortedEntries),  # a repeat in place
    ],
)
def test_an_ops_large_map_decodes_as_the_oracle_decodes_it(pairs: list[tuple[Any, Any]], kind: type) -> None:
    # An op's map argument of more than DATA_KEYS_ABOVE text keys in order is kept as two lists
    # (codec.SortedEntries); the compiled reader decides it while reading, the oracle on the dict.
    data = _op_setting(_map_of(pairs))
    compiled = codec.unpack(data, False, None, False, LOOSE)
    assert compiled == codec.unpack_python(data, False, None, False, LOOSE)
    argument = compiled[0][2]
    assert type(argument) is kind
    as_dict = {key: codec.unpacked(value) for key, value in codec.unpacked(argument).items()}
    assert as_dict == codec.unpack_python(data, False, None, False, None)[0][2]  # the dict it stands for
    if kind is codec.SortedEntries:
        assert all(type(value) is codec.Packed for value in argument.values)
    nested = codec.array_header(1) + _op_setting(_map_of(_IN_ORDER))  # one level deeper: a plain dict
    assert type(codec.unpack(nested, False, None, False, LOOSE)[0][0][2]) is dict


LOOSE = codec.PlainRecords(64, 1 << 20, 1 << 20)  # every plain record kept, whatever its size


@pytest.mark.parametrize("unpack", [codec.unpack_python, codec.unpack])
def test_negative_limits_of_records_are_refused(unpack: Any) -> None:
    with pytest.raises(ValueError, match="limits of records"):
        unpack(codec.pack_python([[1, [], {"a": 1}]]), False, None, False, codec.PlainRecords(-1, 32, 100))
