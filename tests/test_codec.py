"""The value format (codec.py): round-trips, frozen decoding, encoding errors, corrupt input."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protobase
from protobase.core import codec
from protobase.core.codec import Ref
from protobase.core.frozen import FrozenDict, FrozenList, FrozenSet, plain_dataclass
from protobase.errors import CorruptionError, EncodingError, ReadOnlyError


@protobase.register_dataclass
@dataclasses.dataclass
class Point:
    x: int
    y: int
    tags: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Unregistered:
    x: int


def same(a, b) -> bool:
    """Equal, with the same types all the way down (frozen containers and dataclasses count as their plain type)."""
    plain = {FrozenDict: dict, FrozenList: list, FrozenSet: frozenset, set: frozenset}
    ta, tb = plain.get(type(a), plain_dataclass(type(a))), plain.get(type(b), plain_dataclass(type(b)))
    if ta is not tb:
        return False
    if ta is dict:
        return (
            a.keys() == b.keys()
            and all(same(a[k], b[k]) for k in a)
            and all(same(ka, kb) for ka, kb in zip(sorted(a, key=repr), sorted(b, key=repr)))
        )
    if ta in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if ta is dt.datetime:
        return a == b and a.tzinfo == b.tzinfo and a.utcoffset() == b.utcoffset()
    if ta is Decimal:
        return str(a) == str(b)
    return a == b


AWARE = dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    2**200,
    -(3**150),
    0.0,
    -0.0,
    1.5,
    -1e300,
    float("inf"),
    float("-inf"),
    "",
    "héllo ✓",
    "x" * 10_000,
    b"",
    b"\x00\xff" * 100,
    [],
    [1, "a", None],
    (),
    (1, (2, (3,))),
    ("a", [1, 2]),
    {},
    {"a": 1},
    {1: "int key", 2.5: "float key", (1, "t"): "tuple key", b"k": "bytes key", None: 0, False: "b"},
    set(),
    {1, 2, 3},
    {"a", (1, 2), b"b"},
    frozenset({1, "x"}),
    dt.datetime(2020, 1, 2, 3, 4, 5, 6),
    AWARE,
    dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
    dt.date(1999, 12, 31),
    Decimal("1.10"),
    Decimal("-0.000001"),
    Decimal("1E+30"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    uuid.uuid4(),
    Point(1, 2),
    Point(-1, 2**70, ["a", {"b": (1, 2)}]),
    {"nested": [{"deep": {1, 2}}, (dt.date(2000, 1, 1), Decimal("3.14"))], "point": Point(0, 0)},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_round_trip(value, frozen):
    decoded = codec.decode(codec.encode(value), frozen=frozen)
    assert same(decoded, value), (decoded, value)


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, {1, 2}, frozenset({3})])
def test_plain_decode_gives_builtin_containers(value):
    decoded = codec.decode(codec.encode(value), frozen=False)
    assert type(decoded) is type(value)  # a frozenset stays hashable, so it can be a key
    assert decoded == value


def test_bigint_outside_64_bits_uses_bigint_extension():
    data = codec.encode(2**64)
    assert msgpack.unpackb(data, raw=False, ext_hook=lambda code, payload: (code, payload)) == (
        codec.EXT_BIGINT,
        (2**64).to_bytes(9, "little", signed=True),
    )

    assert codec.decode(data) == 2**64
    assert codec.decode(codec.encode(2**64 - 1)) == 2**64 - 1  # still a native msgpack uint64


def test_aware_datetime_keeps_its_offset():
    decoded = codec.decode(codec.encode(AWARE))
    assert decoded.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert decoded.isoformat() == AWARE.isoformat()
    naive = codec.decode(codec.encode(dt.datetime(2020, 1, 1)))
    assert naive.tzinfo is None


def test_date_is_not_decoded_as_datetime():
    assert type(codec.decode(codec.encode(dt.date(2020, 5, 17)))) is dt.date


def test_ref_round_trip_and_resolver():
    data = codec.encode({"child": Ref(0x1_0000000040, 1)})
    assert codec.decode(data)["child"] == Ref(0x1_0000000040, 1)
    seen = []
    decoded = codec.decode(data, ref=lambda ptr, kind: seen.append((ptr, kind)) or "resolved")
    assert decoded == {"child": "resolved"}
    assert seen == [(0x1_0000000040, 1)]


# -- frozen decoding -----------------------------------------------------------------


def test_frozen_decode_returns_frozen_containers_all_the_way_down():
    value = codec.decode(codec.encode({"l": [1, [2]], "d": {"x": {}}, "s": {1}, "t": ([3],)}), frozen=True)
    assert type(value) is FrozenDict
    assert type(value["l"]) is FrozenList and type(value["l"][1]) is FrozenList
    assert type(value["d"]) is FrozenDict and type(value["d"]["x"]) is FrozenDict
    assert type(value["s"]) is FrozenSet
    assert type(value["t"]) is tuple and type(value["t"][0]) is FrozenList
    assert isinstance(value, dict) and isinstance(value["l"], list) and isinstance(value["s"], frozenset)


DICT_WRITES = [
    lambda d: d.__setitem__("a", 2),
    lambda d: d.__delitem__("a"),
    lambda d: d.clear(),
    lambda d: d.pop("a"),
    lambda d: d.popitem(),
    lambda d: d.setdefault("z", 1),
    lambda d: d.update(z=1),
    lambda d: d.__ior__({"z": 1}),
]
LIST_WRITES = [
    lambda v: v.__setitem__(0, 9),
    lambda v: v.__setitem__(slice(0, 1), [9]),
    lambda v: v.__delitem__(0),
    lambda v: v.__iadd__([4]),
    lambda v: v.__imul__(2),
    lambda v: v.append(4),
    lambda v: v.extend([4]),
    lambda v: v.insert(0, 4),
    lambda v: v.pop(),
    lambda v: v.remove(1),
    lambda v: v.clear(),
    lambda v: v.sort(),
    lambda v: v.reverse(),
]
SET_WRITES = [
    lambda s: s.add(4),
    lambda s: s.discard(1),
    lambda s: s.remove(1),
    lambda s: s.pop(),
    lambda s: s.clear(),
    lambda s: s.update({4}),
    lambda s: s.difference_update({1}),
    lambda s: s.intersection_update({1}),
    lambda s: s.symmetric_difference_update({1}),
]


@pytest.mark.parametrize("write", DICT_WRITES)
def test_frozen_dict_refuses_writes(write):
    value = codec.decode(codec.encode({"a": 1, "b": 2}))
    with pytest.raises(ReadOnlyError, match="read-only"):
        write(value)
    assert value == {"a": 1, "b": 2}


@pytest.mark.parametrize("write", LIST_WRITES)
def test_frozen_list_refuses_writes(write):
    value = codec.decode(codec.encode([3, 1, 2]))
    with pytest.raises(ReadOnlyError, match="read-only"):
        write(value)
    assert value == [3, 1, 2]


@pytest.mark.parametrize("write", SET_WRITES)
def test_frozen_set_refuses_writes(write):
    value = codec.decode(codec.encode({1, 2, 3}))
    with pytest.raises(ReadOnlyError, match="read-only"):
        write(value)
    assert value == {1, 2, 3}


def test_frozen_values_are_readable_like_builtins():
    value = codec.decode(codec.encode({"l": [3, 1, 2], "s": {1, 2}}))
    assert sorted(value["l"]) == [1, 2, 3]
    assert value["l"] + [4] == [3, 1, 2, 4]
    assert value["s"] | {3} == {1, 2, 3}
    assert dict(value) == {"l": [3, 1, 2], "s": {1, 2}}
    assert hash(value["s"]) == hash(frozenset({1, 2}))


def test_frozen_values_re_encode():
    value = codec.decode(codec.encode({"l": [1, {"x": {2}}], "t": (1,)}))
    assert same(codec.decode(codec.encode(value), frozen=False), {"l": [1, {"x": {2}}], "t": (1,)})


# -- encoding errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), "cannot store a value of type object at root: "),
        ({"a": [1, object()]}, r"cannot store a value of type object at root\['a'\]\[1\]: "),
        ([{"k": {1: (2, lambda: 0)}}], r"cannot store a value of type function at root\[0\]\['k'\]\[1\]\[1\]: "),
        ({"s": {1, 2j}}, "cannot store a value of type complex at root"),
        (Point(1, object()), r"cannot store a value of type object at root\['y'\]"),
        ({"x": range(3)}, r"cannot store a value of type range at root\['x'\]"),
    ],
)
def test_encoding_error_names_type_and_path(value, message):
    with pytest.raises(EncodingError, match=message) as info:
        codec.encode(value)
    assert "store plain data" in str(info.value)
    with pytest.raises(EncodingError, match=message):
        codec.validate(value)


def test_unregistered_dataclass_hint():
    with pytest.raises(
        EncodingError,
        match=r"cannot store a value of type Unregistered at root\['u'\]: "
        r"register it with protobase.register_dataclass\(\)",
    ):
        codec.encode({"u": Unregistered(1)})


def test_subclasses_of_builtins_are_refused():
    class MyDict(dict):
        pass

    with pytest.raises(EncodingError, match="type .*MyDict at root"):
        codec.encode(MyDict(a=1))


def test_register_dataclass_rejects_non_dataclasses():
    with pytest.raises(TypeError, match="needs a dataclass"):
        protobase.register_dataclass(int)
    with pytest.raises(TypeError, match="needs a dataclass"):
        protobase.register_dataclass(Point(1, 2))


def test_register_dataclass_of_the_running_script_needs_a_name():
    for module in ("__main__", "__mp_main__"):
        script_class = dataclasses.make_dataclass("Item", [("x", int)])
        script_class.__module__ = module
        message = (
            rf"cannot register dataclass Item of the script being run \({module}\) under its default name "
            rf"'{module}.Item': other processes .* Define it in an importable module, or register it with "
            r"name='...' in every process"
        )
        with pytest.raises(EncodingError, match=message):
            protobase.register_dataclass(script_class)
        with pytest.raises(EncodingError, match="cannot store a value of type Item"):
            codec.encode(script_class(1))  # not registered
    protobase.register_dataclass(script_class, name="tests.codec.ScriptItem")
    assert codec.decode(codec.encode(script_class(1))) == script_class(1)


def test_decoded_dataclass_is_read_only_when_frozen_and_plain_otherwise():
    data = codec.encode(Point(1, 2, ["a"]))
    frozen, plain = codec.decode(data), codec.decode(data, frozen=False)
    with pytest.raises(ReadOnlyError, match="cannot set Point.x"):
        frozen.x = 5
    assert isinstance(frozen, Point) and frozen == Point(1, 2, ["a"]) and type(frozen.tags) is FrozenList
    plain.x = 5
    assert type(plain) is Point and plain == Point(5, 2, ["a"]) and type(plain.tags) is list
    assert codec.decode(codec.encode(frozen)) == Point(1, 2, ["a"])  # a read-only copy stores as its class


def test_register_dataclass_under_a_name():
    @dataclasses.dataclass
    class Named:
        v: str

    protobase.register_dataclass(Named, name="tests.codec.Named")
    data = codec.encode(Named("x"))
    assert b"tests.codec.Named" in data
    assert codec.decode(data) == Named("x")


def _cyclic_dict():
    record: dict = {"name": "a"}
    record["children"] = [{"parent": record}]
    return record


def _cyclic_through_a_dataclass():
    point = Point(1, 2)
    point.tags.append({"point": point})
    return point


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (_cyclic_dict(), r"a dict reappears inside itself at root\['children'\]\[0\]\['parent'\]"),
        (_cyclic_through_a_dataclass(), r"a Point reappears inside itself at root\['tags'\]\[0\]\['point'\]"),
        ((lambda items: (items.append(items), items)[1])([]), r"a list reappears inside itself at root\[0\]"),
    ],
    ids=["dict", "dataclass", "list"],
)
def test_a_value_that_contains_itself_is_an_encoding_error(value, where):
    message = f"cannot store a value that contains itself: {where}; stored values are trees of plain data"
    with pytest.raises(EncodingError, match=message):
        codec.validate(value)
    with pytest.raises(EncodingError, match=message):
        codec.encode(value)


def test_values_shared_without_a_cycle_are_stored():
    shared = [1, {"x": 2}]
    value = {"a": shared, "b": shared, "c": (shared, shared)}
    codec.validate(value)
    assert codec.decode(codec.encode(value), frozen=False) == {"a": shared, "b": shared, "c": (shared, shared)}


def _nested(depth, kinds=(list, tuple, dict, Point)):
    """0 inside `depth` containers of `kinds` in turn, each one key below the last."""
    value: object = 0
    for level in range(depth):
        kind = kinds[level % len(kinds)]
        value = {"k": value} if kind is dict else Point(0, 0, value) if kind is Point else kind([value])
    return value


def test_nesting_is_checked_against_max_depth_counting_the_key_path():
    for kinds in ((list,), (tuple,), (dict,), (list, tuple, dict, Point)):
        value = _nested(codec.MAX_DEPTH + 1, kinds)  # its innermost container sits MAX_DEPTH keys down
        codec.validate(value)
        assert codec.decode(codec.encode(value), frozen=False) == value
        with pytest.raises(
            EncodingError,
            match=rf"nested {codec.MAX_DEPTH + 1} keys deep at root\['x'\]\[.*: "
            rf"values may nest at most {codec.MAX_DEPTH} keys below the root",
        ):
            codec.validate(value, ("x",))
    codec.validate([[]], ("k",) * (codec.MAX_DEPTH - 2))
    with pytest.raises(EncodingError, match=f"cannot store a list nested {codec.MAX_DEPTH + 1} keys deep"):
        codec.validate([[[]]], ("k",) * (codec.MAX_DEPTH - 1))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a\ud800b", r"lone surrogate '\\ud800' \(position 1\) at root: text must be valid Unicode; .*surrogateescape"),
        ({"name": ["ok", "caf\udce9"]}, r"lone surrogate '\\udce9' \(position 3\) at root\['name'\]\[1\]"),
        ({"\udfff": 1}, r"lone surrogate '\\udfff' \(position 0\) at root\['\\udfff'\]"),
        (Point(1, 2, ["\ud83d"]), r"lone surrogate '\\ud83d' .* at root\['tags'\]\[0\]"),
    ],
    ids=["str", "nested", "key", "dataclass-field"],
)
def test_text_with_a_lone_surrogate_is_an_encoding_error(value, message):
    with pytest.raises(EncodingError, match=message):
        codec.validate(value)
    with pytest.raises(EncodingError, match=message):
        codec.encode(value)
    codec.validate("paired surrogates decode to one code point: \U0001f600 \u00e9")


# -- corrupt input -------------------------------------------------------------------


def _ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(codec.encode([1, 2, "abc"])[:-2], id="truncated"),
        pytest.param(codec.encode({"a": 2**70})[:-1], id="truncated-bigint"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x01\x02", id="trailing-garbage"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-length"),
        pytest.param(b"\x91" * 100_000 + b"\x00", id="too-deep"),
        pytest.param(_ext(99, b""), id="unknown-ext-code"),
        pytest.param(_ext(0, b"x"), id="ext-code-0"),
        pytest.param(_ext(codec.EXT_REF, b"12"), id="short-ref"),
        pytest.param(_ext(codec.EXT_UUID, b"abc"), id="short-uuid"),
        pytest.param(_ext(codec.EXT_DATETIME, b"nope"), id="bad-datetime"),
        pytest.param(_ext(codec.EXT_DATE, b"\xff"), id="bad-utf8-date"),
        pytest.param(_ext(codec.EXT_DECIMAL, b"xyz"), id="bad-decimal"),
        pytest.param(_ext(codec.EXT_BIGINT, b"abc"), id="bad-bigint"),
        pytest.param(_ext(codec.EXT_TUPLE, b"\xc1"), id="bad-tuple-payload"),
        pytest.param(_ext(codec.EXT_SET, msgpack.packb([[1]])), id="unhashable-set-element"),
        pytest.param(_ext(codec.EXT_DATACLASS, msgpack.packb(5)), id="bad-dataclass-shape"),
        pytest.param(
            _ext(codec.EXT_DATACLASS, msgpack.packb([f"{__name__}.Point", {"nope": 1}])), id="dataclass-wrong-fields"
        ),
        pytest.param(msgpack.packb({(1,): 1}), id="list-as-map-key"),
    ],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_corrupt_bytes_raise_corruption_error(data, frozen):
    with pytest.raises(CorruptionError):
        codec.decode(data, frozen=frozen)


def test_unknown_ext_code_is_named():
    with pytest.raises(CorruptionError, match="unknown msgpack extension type 99"):
        codec.decode(_ext(99, b""))


def test_unregistered_dataclass_on_decode_is_an_encoding_error_not_corruption():
    data = _ext(codec.EXT_DATACLASS, msgpack.packb(["elsewhere.Thing", {"a": 1}]))
    with pytest.raises(
        EncodingError,
        match="dataclass 'elsewhere.Thing', which this process has not registered; "
        r"call protobase.register_dataclass\(\) for it",
    ) as info:
        codec.decode(data)
    assert not isinstance(info.value, CorruptionError)


def test_decode_accepts_memoryview():
    data = codec.encode({"a": [1, 2]})
    assert codec.decode(memoryview(bytearray(b"xx" + data))[2:]) == {"a": [1, 2]}


# -- known gaps -----------------------------------------------------------------------


def test_plain_decode_of_frozenset_key():
    value = {frozenset({1, 2}): "x"}
    assert codec.decode(codec.encode(value), frozen=False) == value


def test_huge_int_round_trip():
    value = 10**5000
    assert codec.decode(codec.encode(value)) == value


# -- property -----------------------------------------------------------------------


_keys = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.tuples(inner, inner),
    max_leaves=4,
)
_offsets = st.builds(dt.timezone, st.integers(-86399, 86399).map(lambda s: dt.timedelta(seconds=s)))
_scalars = (
    _keys
    | st.integers(min_value=-(2**130), max_value=2**130)
    | st.datetimes()
    | st.datetimes(timezones=_offsets)
    | st.dates()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.uuids()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(_keys, inner, max_size=5)
        | st.frozensets(_keys, max_size=5)
        | st.sets(_keys, max_size=5)
        | st.builds(Point, st.integers(), st.integers(), st.lists(inner, max_size=3))
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_round_trip_property(value):
    data = codec.encode(value)
    assert same(codec.decode(data, frozen=False), value)
    assert same(codec.decode(data, frozen=True), value)
    assert same(codec.decode(codec.encode(codec.decode(data, frozen=True)), frozen=False), value)


# -- what the coordinator's writer relies on ---------------------------------------------

SCALAR_KEYS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from(["a", "é", ""]),
    st.sampled_from([1.0, -0.0, 0.5]),
    st.booleans(),
    st.none(),
    st.just(Decimal("1.5")),
    st.just(2**70),
)
KEYS = st.recursive(SCALAR_KEYS, lambda inner: st.tuples(inner, inner) | st.tuples(inner, inner, inner), max_leaves=6)


@given(st.lists(st.lists(KEYS, max_size=20), max_size=6))
@settings(max_examples=200, deadline=None)
def test_key_memo_encodes_exactly_like_encode(key_lists):
    memo = codec.KeyMemo(limit=8)  # small: the memo also restarts along the way
    for keys in key_lists:
        assert memo(keys) == codec.encode(keys)


def test_key_memo_never_confuses_equal_keys_of_other_types():
    memo = codec.KeyMemo()
    for keys in ([(0, 1, "k")], [(0, 1.0, "k")], [(0, True, "k")], [(0, (1,), "k")], [(0, (1.0,), "k")]) * 2:
        assert memo(keys) == codec.encode(keys)
        assert codec.decode(memo(keys), frozen=False) == keys


def test_key_memo_answers_a_copied_node_from_memory():
    memo = codec.KeyMemo()
    keys = [(0, ("city", i), f"user{i}") for i in range(64)]
    first = memo(keys)
    copy = keys[:]  # what copying a node does: a new list, the same key objects
    copy.insert(10, (0, ("city", 99), "new"))
    assert memo(copy) == codec.encode(copy) and first == codec.encode(keys)
    assert len(memo.encoded) == 65


@pytest.mark.parametrize("length", [0, 1, 15, 16, 65_535, 65_536])
def test_array_header_is_msgpack_s(length):
    assert codec.array_header(length) + b"\xc0" * length == codec.encode([None] * length)


@given(st.lists(st.one_of(SCALAR_KEYS, st.text(max_size=5), st.binary(max_size=5)), max_size=8))
def test_may_hold_refs_never_misses_a_ref(items):
    with_ref = codec.encode([*items, {"deep": (1, [Ref(7, 2)])}])
    assert codec.may_hold_refs(with_ref) and codec.may_hold_refs(memoryview(with_ref))
    assert not codec.may_hold_refs(codec.encode([1, "a", (2, None)]))  # no marker, no alarm
