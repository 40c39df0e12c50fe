"""The canonical total order of keys, which lays out every persistent tree.

Python's `hash()` is salted per process, so nothing in shared memory may depend
on it; trees are ordered instead. Keys are grouped into families whose members
Python compares natively (numbers, str, bytes, naive datetimes, dates, UUIDs,
tuples, aware datetimes); families are ordered by rank, and inside a family by
Python's own `<`.


Invariant: for two keys of one family, `order_key(a) < order_key(b)` exactly
when `a < b`. So a bisect over a node's keys may compare natively (C speed)
and fall back to `order_key` only when it meets keys of two families, which
Python refuses to compare with TypeError (see `bisect_left` below).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import uuid
from decimal import Decimal
from typing import Any

from protobase.errors import EncodingError, format_path

__all__ = ["KEY_TYPES", "order_key", "check_key", "check_text", "is_key", "family", "bisect_left", "bisect_right"]


_RANKS = {
    type(None): 0,
    bool: 1,
    int: 1,
    float: 1,
    Decimal: 1,
    str: 2,
    bytes: 3,
    _dt.datetime: 4,
    _dt.date: 5,
    uuid.UUID: 6,
    tuple: 7,
}
KEY_TYPES = frozenset(_RANKS)  # the exact types a key may have
_AWARE_DATETIME = 8  # aware datetimes are a family of their own, after every other


def order_key(key: Any) -> tuple[Any, ...]:
    """The position of `key` in the canonical order, as a comparable tuple."""
    rank = _RANKS[type(key)]
    if rank == 7:
        return (7, tuple(order_key(item) for item in key))
    if rank == 0:
        return (0, 0)
    if rank == 4 and key.utcoffset() is not None:
        return (_AWARE_DATETIME, key)  # Python cannot compare aware with naive datetimes
    return (rank, key)


def check_key(key: Any, path: tuple[Any, ...] = ()) -> None:
    """Raise EncodingError unless `key` may be a key of a stored dict or set."""
    kind = type(key)
    if kind not in _RANKS:
        raise EncodingError(
            f"cannot use a key of type {kind.__qualname__} at {format_path(path)}: keys of stored "
            f"dicts and elements of stored sets must be None, bool, int, float, Decimal, str, "
            f"bytes, datetime, date, UUID or tuples of those"
        )
    if kind is float and key != key:
        raise EncodingError(f"cannot use NaN as a key at {format_path(path)}: NaN is not equal to itself")
    if kind is Decimal and key.is_nan():  # sNaN too, which even refuses to be hashed or compared
        raise EncodingError(
            f"cannot use Decimal({str(key)!r}) as a key at {format_path(path)}: a NaN is not "
            f"equal to itself and cannot be ordered among numbers"
        )
    if kind is str:
        check_text(key, path)
    if kind is tuple:
        for item in key:
            check_key(item, path)


def check_text(text: str, path: tuple[Any, ...] = ()) -> None:
    """Raise EncodingError unless `text` is valid Unicode, which UTF-8 (hence msgpack) can encode.

    Lives here, not in the codec, because keys are checked here and values
    there: both call it.
    """
    if text.isascii():  # O(1): CPython records it
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise EncodingError(
            f"cannot store a str holding the lone surrogate {text[error.start]!r} (position {error.start}) "
            f"at {format_path(path)}: text must be valid Unicode; it typically comes from decoding bytes with "
            f"errors='surrogateescape': decode with errors='replace', or store the bytes"
        ) from None


def is_key(value: Any) -> bool:
    """True when `value` may be a key (see check_key), without raising."""
    kind = type(value)
    if kind not in _RANKS:
        return False
    if kind is float:
        number: float = value
        return number == number  # False for NaN only
    if kind is Decimal:
        return not value.is_nan()
    if kind is tuple:
        return all(is_key(item) for item in value)
    return True


def family(value: Any) -> int:
    """The rank of `value`'s family: values of one family compare natively."""
    rank: int = order_key(value)[0]
    return rank


def bisect_left(keys: list[Any], key: Any) -> int:
    """bisect.bisect_left over keys in canonical order."""
    try:
        return bisect.bisect_left(keys, key)
    except TypeError:
        return bisect.bisect_left(keys, order_key(key), key=order_key)


def bisect_right(keys: list[Any], key: Any) -> int:
    """bisect.bisect_right over keys in canonical order."""
    try:
        return bisect.bisect_right(keys, key)
    except TypeError:
        return bisect.bisect_right(keys, order_key(key), key=order_key)
