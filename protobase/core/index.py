"""Secondary indexes: what an index holds and how it is searched.

Owns the index entry format, shared by the coordinator (which maintains
indexes in the same commit as the data) and every reader (which searches
them). An indexed collection is one atom of kind INDEXED:

    {"data": AtomPointer of the records' dict tree,
     "indexes": {field: AtomPointer of the index's set tree}}

so its indexes travel with it and change by path copying like everything
else. A field is a dotted path into each record ("address.city").

An index is a set tree of entries `(kind, value, key)`: kind 0 for the
field's value itself, kind 1 for each element of a list, tuple or set value
(what `F.tags.contains(x)` searches). Only values that may be keys (see
keyorder.is_key) have entries: a record lacking the field, or holding a dict
there, is simply absent, and values of different types sit in separate
families of the canonical order, so they never break an index.

Entries are ordered canonically, so one B+tree answers equality, membership
and ranges, and its subtree sizes count any range in O(log n) for the planner.

Invariant (checked by `db.check()`): an index holds exactly the entries its
collection's records produce.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from protobase.core.arena import SET_LEAF
from protobase.core.btree import Node, TreeAccess
from protobase.keyorder import family, is_key, order_key

__all__ = ["IndexedColl", "MISSING", "field_path", "field_value", "entries", "index_entries", "scan_between",
           "scan_equal", "scan_range", "count_range", "composite_bounds", "VALUE_ENTRY", "ELEMENT_ENTRY"]


VALUE_ENTRY, ELEMENT_ENTRY = 0, 1
_COLLECTIONS = (list, tuple, set, frozenset)


class _Missing:
    """The value of a field a record does not have."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING = _Missing()


class IndexedColl:
    """The coordinator's working form of an indexed collection."""

    __slots__ = ("data", "indexes")

    def __init__(self, data: Node | int, indexes: dict[str, Node | int]) -> None:
        self.data = data  # the records' dict tree
        self.indexes = indexes  # {field -> index set tree}


def field_path(field: str | tuple) -> tuple:
    """("address", "city") from "address.city" (a tuple passes through)."""
    if isinstance(field, tuple):
        return field
    if not isinstance(field, str) or not field:
        raise ValueError(f"an index field is a non-empty dotted name like 'address.city', got {field!r}")
    return tuple(field.split("."))


def field_value(record: Any, path: tuple, resolve: Any = None) -> Any:
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


def entries(value: Any) -> set[tuple[int, Any]]:
    """The (kind, value) entries a field value contributes to an index."""
    found = set()
    if value is MISSING:
        return found
    if is_key(value):
        found.add((VALUE_ENTRY, value))
    if isinstance(value, _COLLECTIONS) or getattr(value, "_index_elements_", False):
        found.update((ELEMENT_ENTRY, item) for item in value if is_key(item))
    return found


def _order_keys(node: Node) -> list:
    """The order keys of a node's keys; cached on clean nodes, which never change."""
    cached = node.order_keys
    if cached is None:
        cached = [order_key(key) for key in node.keys]
        if node.ptr is not None:
            node.order_keys = cached
    return cached


def _chunks_from(access: TreeAccess, root: int | Node, start: tuple) -> Iterator[tuple[Node, int]]:
    """(leaf, position of its first entry to read), in order, from the first entry >= `start` (an order key).

    Iterative, with the path from the root on a stack: a query reading one
    leaf pays no chain of nested generators.
    """
    node = access.node(root, SET_LEAF)
    path: list[tuple[list, int]] = []  # (children of a branch on the way down, the next one to visit)
    while node.sizes is not None:
        position = bisect.bisect_right(_order_keys(node), start)
        path.append((node.values, position + 1))
        node = access.node(node.values[position], SET_LEAF)
    first = bisect.bisect_left(_order_keys(node), start)
    while True:
        if first < len(node.keys):
            yield node, first
        while path and path[-1][1] >= len(path[-1][0]):
            path.pop()
        if not path:
            return
        children, position = path.pop()
        path.append((children, position + 1))
        node = access.node(children[position], SET_LEAF)
        while node.sizes is not None:  # down the leftmost edge of the next subtree
            path.append((node.values, 1))
            node = access.node(node.values[0], SET_LEAF)
        first = 0


def scan_between(access: TreeAccess, root: int, start: tuple, stop: tuple) -> list:
    """Record keys of the entries in [start, stop) (order keys): bisected per leaf, no per-entry test."""
    if not root:
        return []
    found: list = []
    for leaf, first in _chunks_from(access, root, start):
        keys = leaf.keys
        if leaf.order_keys is None and order_key(keys[-1]) < stop:
            end = len(keys)  # the whole leaf is in range: no need to compute its order keys
        else:
            end = bisect.bisect_left(_order_keys(leaf), stop, first)
        found.extend(entry[2] for entry in keys[first:end])
        if end < len(keys):
            break
    return found


def scan_equal(access: TreeAccess, root: int, kind: int, value: Any) -> list:
    """Keys of the records whose entry (kind, value) is in the index."""
    return scan_between(access, root, *equal_bounds(kind, value))


def scan_range(access: TreeAccess, root: int, low: Any, high: Any, include_low: bool,
               include_high: bool) -> list:
    """Keys of the records whose value lies between `low` and `high` (None: unbounded).

    Only values of the bounds' family compare with them, as in Python, where
    `5 < "a"` raises: a string never falls in a numeric range.
    """
    if not root:
        return []
    bound = low if low is not None else high
    rank = family(bound)
    start = order_key((VALUE_ENTRY, low)) if low is not None else (7, ((1, VALUE_ENTRY), (rank,)))
    if rank == 7:  # tuples: Python may refuse to compare them, so walk by canonical order, recheck natively
        return _scan_tuple_range(access, root, start, low, high, include_low, include_high)
    # Inside one family the canonical order is Python's: the range is one slice.
    return scan_between(access, root, *range_bounds(low, high, include_low, include_high))


def _scan_tuple_range(access: TreeAccess, root: int, start: tuple, low: Any, high: Any, include_low: bool,
                      include_high: bool) -> list:
    high_key = order_key(high) if high is not None else None
    found = []
    for leaf, first in _chunks_from(access, root, start):
        for entry_kind, value, key in leaf.keys[first:]:
            if entry_kind != VALUE_ENTRY or family(value) != 7:
                return found
            if high_key is not None and order_key(value) > high_key:
                return found
            if _natively_in_range(value, low, high, include_low, include_high):
                found.append(key)
    return found


def _natively_in_range(value: Any, low: Any, high: Any, include_low: bool, include_high: bool) -> bool:
    try:
        if low is not None and not (value >= low if include_low else value > low):
            return False
        return high is None or (value <= high if include_high else value < high)
    except TypeError:
        return False


def count_below(access: TreeAccess, root: int, start: tuple) -> int:
    """How many entries sort before `start` (an order key): O(log n) through subtree sizes."""
    node = access.node(root, SET_LEAF)
    below = 0
    while node.sizes is not None:
        position = bisect.bisect_right(_order_keys(node), start)
        below += sum(node.sizes[:position])
        node = access.node(node.values[position], SET_LEAF)
    return below + bisect.bisect_left(_order_keys(node), start)


def count_range(access: TreeAccess, root: int, start: tuple, stop: tuple) -> int:
    """How many entries lie in [start, stop) (order keys)."""
    if not root:
        return 0
    return max(0, count_below(access, root, stop) - count_below(access, root, start))


def equal_bounds(kind: int, value: Any) -> tuple[tuple, tuple]:
    """Order keys bracketing every entry (kind, value, *)."""
    low = order_key((kind, value))
    return low, (low[0], low[1] + ((99,),))


def range_bounds(low: Any, high: Any, include_low: bool = True, include_high: bool = True) -> tuple[tuple, tuple]:
    """Order keys bracketing exactly the entries with low <(=) value <(=) high (None: open)."""
    bound = low if low is not None else high
    rank = family(bound)
    if low is None:
        start = (7, ((1, VALUE_ENTRY), (rank,)))
    else:
        start = order_key((VALUE_ENTRY, low)) if include_low else equal_bounds(VALUE_ENTRY, low)[1]
    if high is None:
        stop = (7, ((1, VALUE_ENTRY), (rank + 1,)))
    else:
        stop = equal_bounds(VALUE_ENTRY, high)[1] if include_high else order_key((VALUE_ENTRY, high))
    return start, stop


# -- composite indexes --------------------------------------------------------------------
#
# An index on several fields, `create_index("city", "score")`, is named by the
# tuple of its fields and holds one entry (0, (city, score), key) per record
# that has every field with a key-able value. Its entries sort by city, then
# score, so equalities on a prefix of the fields plus a range on the next field
# select one contiguous slice: the work is the size of the result.


def index_entries(record: Any, field: str | tuple, resolve: Any = None) -> set[tuple[int, Any]]:
    """The (kind, value) entries `record` contributes to the index named `field`."""
    if isinstance(field, str):
        return entries(field_value(record, field_path(field), resolve))
    values = tuple(field_value(record, field_path(part), resolve) for part in field)
    if any(value is MISSING for value in values) or not is_key(values):
        return set()
    return {(VALUE_ENTRY, values)}


def _entry_bound(value_key: tuple) -> tuple:
    """The order key of an entry position, from the order key of its value part."""
    return (7, ((1, VALUE_ENTRY), value_key))


def composite_bounds(prefix: tuple, low: Any = None, high: Any = None, include_low: bool = True,
                     include_high: bool = True, ranged: bool = False) -> tuple[tuple, tuple]:
    """Order keys bracketing the entries whose fields start with `prefix` (equalities),
    then, when `ranged`, whose next field lies in the range (None: an open side)."""
    head = tuple(order_key(value) for value in prefix)
    if not ranged:
        return _entry_bound((7, head)), _entry_bound((7, head + ((99,),)))
    rank = family(low if low is not None else high)
    if low is None:
        start = _entry_bound((7, head + ((rank,),)))
    else:
        low_key = order_key(low)
        start = _entry_bound((7, head + (low_key if include_low else low_key + ((99,),),)))
    if high is None:
        stop = _entry_bound((7, head + ((rank + 1,),)))
    else:
        high_key = order_key(high)
        stop = _entry_bound((7, head + (high_key + ((99,),) if include_high else high_key,)))
    return start, stop
