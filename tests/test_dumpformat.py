"""Tests of protobase/cli/dumpformat.py: the tagged JSON of `protobase dump`, without a database.

Every value type round-trips through the text; a dump line carries its
indexed dicts' fields out; a value without an encoding, a tag that does not
exist and a line that is not one are refused with messages that say where.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal

import pytest

from protobase.cli.command import CommandError
from protobase.cli.dumpformat import (
    BIG_INT_BITS,
    UnsupportedValue,
    decode_value,
    encode_value,
    read_line,
    write_line,
    write_value,
)


def typed(value):
    """A hashable, type-revealing form of a snapshot value (NaN-safe, keeps datetime offsets, indexes)."""
    if isinstance(value, Mapping):
        items = frozenset((typed(key), typed(item)) for key, item in value.items())
        return ("dict", tuple(sorted(getattr(value, "indexes", ()))), items)
    if isinstance(value, tuple):
        return ("tuple", tuple(typed(item) for item in value))
    if isinstance(value, AbstractSet):
        return ("set", frozenset(typed(item) for item in value))
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return ("list", tuple(typed(item) for item in value))
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    if isinstance(value, int) and value.bit_length() > 1000:
        return ("int", hex(value))
    if isinstance(value, Decimal):
        return ("Decimal", str(value))  # Decimal("NaN") != itself
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat())
    return (type(value).__name__, value)


def sample_root() -> dict:
    return {
        "scalars": {
            "none": None,
            "t": True,
            "f": False,
            "int": -(2**70),
            "float": 1.5,
            "nan": math.nan,
            "inf": -math.inf,
            "str": 'héllo "quoted"\n',
            "empty": "",
        },
        "huge": [7**9000, -(3**20000)],  # beyond int <-> str limits
        "tuple": (1, "a", (2, (3,)), None),
        "set": {1, "b", (1, 2), b"x", 2.5},
        "frozen": frozenset({1, 2}),
        "bytes": bytes(range(256)),
        "aware": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
        "naive": dt.datetime(1999, 12, 31, 23, 59, 59),
        "date": dt.date(2020, 2, 29),
        "decimal": [Decimal("1.10"), Decimal("-0"), Decimal("1E+3"), Decimal("NaN")],
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "odd keys": {
            1: "int",
            (1, "t"): "tuple",
            None: "none",
            "$dollar": "d",
            b"k": "bytes",
            dt.date(2020, 1, 1): "date",
            2.5: "float",
        },
        ("tuple", 1): "a tuple key at the root",
        7: "an int key at the root",
        "$set": {"$set": [1, 2]},  # looks like a tag: must stay a dict
        "nested": {"a": [{"b": ({"c": {1, 2}},)}], "deep": {"x": {"y": {"z": [dt.date(2001, 1, 1)]}}}},
        "big dict": {f"u{i}": {"n": i, "tags": [i % 3], "when": dt.date(2020, 1, 1 + i % 28)} for i in range(300)},
        "big set": {i * 3 for i in range(250)},
        "big list": [{"i": i} if i % 2 else (i, str(i)) for i in range(600)],
        "big odd keys": {(i, "k"): i for i in range(100)},
        "indexed": {f"p{i}": {"age": i % 7, "city": ["x", "y"][i % 2]} for i in range(120)},
        "empty": {"d": {}, "l": [], "s": set(), "t": ()},
    }


class Indexed(dict):
    """A dict that says it has indexes, as an IndexedTreeDict of a snapshot does."""

    def __init__(self, items: dict, indexes: tuple[str, ...]) -> None:
        super().__init__(items)
        self.indexes = indexes


def line_of(key, value) -> str:
    parts: list[str] = []
    write_line(key, value, parts.append)
    return "".join(parts)


def test_every_type_round_trips():
    for value in sample_root().values():
        assert typed(decode_value(encode_value(value))) == typed(value)


def test_encodings_are_the_documented_ones():
    assert encode_value({"a": [1, None, True]}) == '{"a":[1,null,true]}'
    assert encode_value({"$set": 1, 2: 3}) == '{"$dict": [["$set",1],[2,3]]}'  # such keys cannot be an object
    assert encode_value({3, 1, 2}) == '{"$set": [1,2,3]}'  # small sets in canonical order: reproducible dumps
    assert encode_value((1,)) == '{"$tuple": [1]}'
    assert encode_value(b"\x00\xff") == '{"$bytes": "AP8="}'
    assert encode_value(math.inf) == '{"$float": "inf"}'
    assert encode_value(dt.date(2020, 2, 29)) == '{"$date": "2020-02-29"}'
    assert encode_value(Decimal("1.10")) == '{"$decimal": "1.10"}'
    assert encode_value(uuid.UUID(int=1)) == '{"$uuid": "00000000-0000-0000-0000-000000000001"}'
    big = 1 << BIG_INT_BITS
    assert encode_value(big) == json.dumps({"$int": hex(big)}) and decode_value(encode_value(big)) == big
    assert encode_value((1 << BIG_INT_BITS) - 1).isdigit()  # up to the limit, a plain JSON number


def test_a_dump_line_carries_its_indexes_out():
    value = {"people": Indexed({"p1": {"age": 3}}, ("age", "city")), "more": {"deep": Indexed({}, ("x",))}}
    line = line_of("root key", value)
    assert line.endswith("}\n") and json.loads(line)["key"] == "root key"
    key, decoded, indexes = read_line(line)
    assert key == "root key"
    assert decoded == {"people": {"p1": {"age": 3}}, "more": {"deep": {}}}
    assert type(decoded["people"]) is dict and type(decoded["more"]["deep"]) is dict  # plain dicts again
    assert indexes == [(("people",), ("age", "city")), (("more", "deep"), ("x",))]
    key, decoded, indexes = read_line(line_of("top", Indexed({"a": 1}, ("n",))))
    assert (decoded, indexes) == ({"a": 1}, [((), ("n",))])
    key, decoded, indexes = read_line(line_of("list", [Indexed({"a": 1}, ("n",))]))
    assert (decoded, indexes) == ([{"a": 1}], []) and type(decoded[0]) is dict  # no key path: not recreated


def test_keys_decode_hashable():
    key, value, _ = read_line(line_of(("t", frozenset({1})), {frozenset({2}): {3}}))
    assert key == ("t", frozenset({1})) and value == {frozenset({2}): {3}}
    hash(key)


def test_a_value_without_an_encoding_is_named_by_its_place():
    with pytest.raises(
        CommandError,
        match=r"^cannot dump value\['a'\]\[1\]: a builtins\.object \(registered "
        r"dataclasses and other types have no dump encoding\)$",
    ):
        encode_value({"a": [1, object()]})
    with pytest.raises(UnsupportedValue) as caught:
        write_value({"k": {(1, 2): [object()]}}, lambda text: None)
    assert caught.value.describe("root['x']").startswith("cannot dump root['x']['k'][(1, 2)][0]: a builtins.object")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"key": "b", "value": {"$nope": 1}}', r"unknown tag '\$nope' \(known: \$int, \$float, "),
        ('{"key": "b", "value": {"$bytes": "not base64!"}}', r"bad \$bytes value 'not base64!': "),
        ('{"key": "b", "value": {"$date": 7}}', r"bad \$date value 7: "),
        ('{"key": "b"}', r'expected an object \{"key": \.\.\., "value": \.\.\.\}'),
        ("[1, 2]", r'expected an object \{"key"'),
        ("not json", r"Expecting value"),
    ],
)
def test_a_bad_line_is_a_value_error_saying_why(line, message):
    with pytest.raises(ValueError, match=message):
        read_line(line)


def test_an_object_that_only_looks_like_a_tag_is_a_dict():
    assert decode_value('{"$set": [1], "other": 2}') == {"$set": [1], "other": 2}  # two keys: not a tag
    assert decode_value('{"plain": {"$tuple": [1]}}') == {"plain": (1,)}
