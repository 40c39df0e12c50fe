"""The dump format: tagged JSON for every value ProtoBase stores, one JSON line per top-level key.

Owns the encoding `protobase dump` writes and `protobase load` reads; pure
functions, run in the process of the command. Invariant: for every value it
accepts, ``decode_value(encode_value(v)) == v`` (with sets read back from a
snapshot as sets, indexed dicts as plain dicts plus their index fields), and
every line is valid JSON on its own.

A dump is JSON lines, one per top-level key of the root, in the root's order:
`{"key": K, "value": V}`, K and V in this tagged encoding:

    None, bool, int, str, float     themselves (ints beyond 10,000 bits: {"$int": "0x..."};
                                    NaN and infinities: {"$float": "nan" | "inf" | "-inf"})
    list                            a JSON array
    dict with str keys, none of     a JSON object
      them starting with "$"
    any other dict                  {"$dict": [[key, value], ...]}
    tuple                           {"$tuple": [...]}
    set                             {"$set": [...]}  (also {"$frozenset": [...]}; a snapshot
                                    reads both as a FrozenSet, so dump writes "$set")
    bytes                           {"$bytes": "<base64>"}
    datetime.datetime               {"$datetime": "<ISO 8601, offset kept when aware>"}
    datetime.date                   {"$date": "<ISO 8601>"}
    decimal.Decimal                 {"$decimal": "<str(value)>"}
    uuid.UUID                       {"$uuid": "<canonical text>"}
    indexed dict                    {"$indexed": {"fields": [...], "items": <dict as above>}}

A JSON object with exactly one key, starting with "$", is always a tag (an
unknown tag is an error), which is why dicts with such keys use "$dict".
Set elements and dict keys decode hashable (a nested set as a frozenset).
Registered dataclasses are not dumped (the command line cannot know their
classes): dump fails naming the value.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from typing import Any

from protobase.cli.command import CommandError
from protobase.keyorder import order_key

__all__ = [
    "BIG_INT_BITS",
    "IndexFields",
    "UnsupportedValue",
    "write_value",
    "write_line",
    "read_line",
    "encode_value",
    "decode_value",
]

BIG_INT_BITS = 10_000  # beyond this, ints are written in hex (int <-> decimal str is limited)

IndexFields = tuple[tuple[Any, ...], tuple[str, ...]]  # (key path of an indexed dict inside a value, its fields)

_TAGS = (
    "$int",
    "$float",
    "$dict",
    "$tuple",
    "$set",
    "$frozenset",
    "$bytes",
    "$datetime",
    "$date",
    "$decimal",
    "$uuid",
    "$indexed",
)


# -- encoding --------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """The JSON-safe form of a non-container value, or NotImplemented for containers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return {"$int": hex(value)} if value.bit_length() > BIG_INT_BITS else value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    return NotImplemented


def _plain_keys(mapping: Mapping[Any, Any]) -> bool:
    return all(type(key) is str and not key.startswith("$") for key in mapping)


class UnsupportedValue(Exception):
    """A value with no dump encoding; `path` is filled in (innermost first) on the way out."""

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self.value = value  # the value without an encoding
        self.path: list[str] = []  # ["[key]", "[0]", ...], innermost first

    def describe(self, what: str) -> str:
        """The message for the user, with `what` naming the outermost value (e.g. "root['users']")."""
        kind = type(self.value)
        return (
            f"cannot dump {what}{''.join(reversed(self.path))}: a {kind.__module__}.{kind.__qualname__} "
            f"(registered dataclasses and other types have no dump encoding)"
        )


_encode_str = json.encoder.encode_basestring  # the C encoder when available; ensure_ascii=False
_int_repr = int.__repr__
_float_repr = float.__repr__
_CONSTANTS = {None: "null", True: "true", False: "false"}


def write_value(value: Any, write: Callable[[str], object]) -> None:
    """Write the tagged JSON of `value` piece by piece (containers element by element).

    Raises UnsupportedValue for a value without an encoding (a dataclass, say).
    """
    kind = type(value)
    if kind is str:
        write(_encode_str(value))
        return
    if kind is int and value.bit_length() <= BIG_INT_BITS:
        write(_int_repr(value))
        return
    if kind is float and math.isfinite(value):
        write(_float_repr(value))
        return
    if value is None or kind is bool:
        write(_CONSTANTS[value])
        return
    scalar = _scalar(value)
    if scalar is not NotImplemented:
        write(json.dumps(scalar, ensure_ascii=False))
        return
    if isinstance(value, Mapping):
        _write_mapping(value, write)
        return
    if isinstance(value, tuple):
        prefix, suffix = '{"$tuple": [', "]}"
    elif isinstance(value, AbstractSet):
        prefix, suffix = '{"$set": [', "]}"
        if not hasattr(value, "ptr"):  # a small set: canonical order, so that dumps are reproducible
            value = sorted(value, key=order_key)
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, str)):
        prefix, suffix = "[", "]"
    else:
        raise UnsupportedValue(value)
    write(prefix)
    for number, item in enumerate(value):
        if number:
            write(",")
        try:
            write_value(item, write)
        except UnsupportedValue as error:
            error.path.append(f"[{number}]")
            raise
    write(suffix)


def _write_mapping(value: Mapping[Any, Any], write: Callable[[str], object]) -> None:
    """Write a dict: a JSON object when its keys allow, else "$dict" pairs; "$indexed" around it if indexed."""
    indexes = tuple(getattr(value, "indexes", ()) or ())
    if indexes:
        write('{"$indexed": {"fields": ')
        write(json.dumps(list(indexes), ensure_ascii=False))
        write(', "items": ')
    plain = _plain_keys(value)
    write("{" if plain else '{"$dict": [')
    for number, (key, item) in enumerate(value.items()):
        try:
            if plain:
                write(("," if number else "") + _encode_str(key) + ":")
            else:
                write(",[" if number else "[")
                write_value(key, write)
                write(",")
            write_value(item, write)
            if not plain:
                write("]")
        except UnsupportedValue as error:
            error.path.append(f"[{key!r}]")
            raise
    write("}" if plain else "]}")
    if indexes:
        write("}}")


def write_line(key: Any, value: Any, write: Callable[[str], object]) -> None:
    """Write the dump line of one top-level key: ``{"key": K, "value": V}`` and a newline.

    Raises UnsupportedValue (its `describe` names the place) for a key or
    value without an encoding; what was written of the line stays written.
    """
    write('{"key": ')
    write_value(key, write)
    write(', "value": ')
    write_value(value, write)
    write("}\n")


def encode_value(value: Any) -> str:
    """The tagged JSON text of `value` (for small values; dump streams)."""
    parts: list[str] = []
    try:
        write_value(value, parts.append)
    except UnsupportedValue as error:
        raise CommandError(error.describe("value")) from None
    return "".join(parts)


# -- decoding --------------------------------------------------------------------------------


class _Indexed(dict[Any, Any]):
    """A decoded indexed dict, until load has created its indexes."""

    fields: tuple[str, ...] = ()


def _hashable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return frozenset(_hashable(item) for item in value)
    if isinstance(value, tuple):
        return tuple(_hashable(item) for item in value)
    return value


def _object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) != 1:
        return obj
    ((tag, payload),) = obj.items()
    if not tag.startswith("$"):
        return obj
    if tag not in _TAGS:
        raise ValueError(f"unknown tag {tag!r} (known: {', '.join(_TAGS)})")
    try:
        return _decode_tag(tag, payload)
    except (TypeError, ValueError, KeyError, ArithmeticError) as error:
        raise ValueError(f"bad {tag} value {payload!r:.80}: {error}") from None


def _decode_tag(tag: str, payload: Any) -> Any:
    """The value of a one-key object {tag: payload}, `tag` one of _TAGS; a bad payload raises what its parser does."""
    if tag == "$int":
        return int(payload, 16)
    if tag == "$float":
        return float(payload)
    if tag == "$dict":
        return {_hashable(key): value for key, value in payload}
    if tag == "$tuple":
        return tuple(payload)
    if tag == "$set":
        return {_hashable(item) for item in payload}
    if tag == "$frozenset":
        return frozenset(_hashable(item) for item in payload)
    if tag == "$bytes":
        return base64.b64decode(payload, validate=True)
    if tag == "$datetime":
        return dt.datetime.fromisoformat(payload)
    if tag == "$date":
        return dt.date.fromisoformat(payload)
    if tag == "$decimal":
        return Decimal(payload)
    if tag == "$uuid":
        return uuid.UUID(payload)
    if tag == "$indexed":
        indexed = _Indexed(payload["items"])
        indexed.fields = tuple(payload["fields"])
        return indexed
    raise AssertionError(f"tag {tag!r} is in _TAGS but has no decoder")


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, _Indexed) else value


def _take_indexes(value: Any, path: tuple[Any, ...]) -> list[IndexFields]:
    """(path, fields) of every indexed dict reachable by dict keys; turns them into plain dicts."""
    found: list[IndexFields] = []
    if isinstance(value, list):  # not addressable by key path: an index there cannot be recreated
        for number, item in enumerate(value):
            _take_indexes(item, path + (number,))
            if isinstance(item, _Indexed):
                value[number] = dict(item)
        return found
    if not isinstance(value, dict):
        return found
    if isinstance(value, _Indexed):
        found.append((path, value.fields))
    for key, item in value.items():
        if isinstance(item, dict):
            found.extend(_take_indexes(item, path + (key,)))
            if isinstance(item, _Indexed):
                value[key] = dict(item)
    return found


def decode_value(text: str) -> Any:
    """The value of tagged JSON text (indexed dicts come back as plain dicts)."""
    value = json.loads(text, object_hook=_object_hook)
    _take_indexes(value, ())
    return _plain(value)


def read_line(line: str) -> tuple[Any, Any, list[IndexFields]]:
    """(key, value, indexes) of one dump line; ValueError when it is not one.

    The key comes back hashable; indexed dicts in the value come back as
    plain dicts, and `indexes` says where they were and on which fields, so
    that load creates the indexes once the value is committed.
    """
    record = json.loads(line, object_hook=_object_hook)  # json.JSONDecodeError is a ValueError
    if not isinstance(record, dict) or set(record) != {"key", "value"}:
        raise ValueError('expected an object {"key": ..., "value": ...}')
    key, value = _hashable(_plain(record["key"])), record["value"]
    indexes = _take_indexes(value, ())
    return key, _plain(value), indexes
