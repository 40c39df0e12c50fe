"""Field paths into records, and reading the value a record holds at one.

Owns what a field name means, for queries and for indexes alike: "address.city"
is the path ("address", "city"), and a record's value there is found by
subscripting step by step; a record without it has the value MISSING. The
coordinator (maintaining indexes) and every reader (querying, checking them)
share these functions, so an index and a full scan agree on every record.

Runs in any process; pure functions over values, no state. Invariant: a path
is a non-empty tuple, and `field_value` never raises for a record that lacks
the path or holds a non-mapping on the way: that record has MISSING there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

__all__ = ["MISSING", "FieldPath", "FieldName", "field_path", "field_value", "field_name"]

FieldPath = tuple[Any, ...]
"""("address", "city"): the segments of a field, each a mapping key (F["odd key"], F[0] allow non-names)."""

FieldName = str | FieldPath
"""A field as users write it: a dotted name ("address.city") or a path."""


class _Missing:
    """The value of a field a record does not have (falsy; MISSING is the one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


def field_path(field: FieldName) -> FieldPath:
    """("address", "city") from "address.city" (a tuple passes through).

    Raises ValueError for an empty name or anything but a str or a tuple.
    """
    if isinstance(field, tuple):
        return field
    if not isinstance(field, str) or not field:
        raise ValueError(f"an index field is a non-empty dotted name like 'address.city', got {field!r}")
    return tuple(field.split("."))


def field_value(record: Any, path: FieldPath, resolve: Callable[[Any], Any] | None = None) -> Any:
    """The value at `path` inside a record (any mapping), or MISSING.

    `resolve(value)`, when given, turns each step's raw value into a readable
    one (the coordinator reads records in their stored form).
    """
    value = record
    for segment in path:
        try:
            value = value[segment]
        except (KeyError, TypeError, IndexError):
            return MISSING
        if resolve is not None:
            value = resolve(value)
        if value is MISSING:
            return MISSING
    return value


def field_name(path: FieldPath) -> str:
    """ "address.city" for ("address", "city"): how explain() and reprs show a field."""
    return ".".join(str(segment) for segment in path)
