"""Read-only values handed out by snapshots, and their plain copies.

A snapshot returns `FrozenDict`, `FrozenList` and `FrozenSet`: subclasses of the
builtins, so reads run at C speed and `isinstance(v, dict)` holds, whose every
mutating method raises `ReadOnlyError`. Their storage is their whole contents,
so C consumers (json, `**`, `dict()`) see everything. The decoded objects live
in the per-process `AtomObjectCache` and are shared by every snapshot of the
process, so nothing a user does through the public methods may change them.

`thaw` makes a deep plain mutable copy of any of them (and of tree views and
transaction wrappers); `json_default` is the `default=` that lets json.dumps
write them.

Invariant: a frozen container only ever holds frozen containers, tuples,
scalars, or lazy views of persistent trees (themselves read-only).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any, NoReturn

from .errors import ReadOnlyError
from .keyorder import is_key, order_key

__all__ = ["FrozenDict", "FrozenList", "FrozenSet", "freeze", "thaw", "json_default", "READ_ONLY_HINT"]

READ_ONLY_HINT = (
    "values read from a snapshot are read-only; change them inside "
    "`with db.transaction() as tx:` instead"
)


def _read_only(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise ReadOnlyError(f"cannot modify a {type(self).__name__}: {READ_ONLY_HINT}")


class FrozenDict(dict):
    """A dict from a snapshot: reads like a dict, refuses every write."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))

    def where(self, expr: Any = None) -> Any:
        """The records (values) matching `expr`; see protobase.query."""
        from .query import Query

        return Query(self, expr)

    @property
    def indexes(self) -> tuple[str, ...]:
        return ()

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


class FrozenList(list):
    """A list from a snapshot: reads like a list, refuses every write."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce__(self) -> tuple:
        return (FrozenList, (list(self),))

    def __repr__(self) -> str:
        return f"FrozenList({list.__repr__(self)})"


class FrozenSet(frozenset):
    """A set from a snapshot: a frozenset that answers set's mutators with ReadOnlyError."""

    __slots__ = ()
    add = discard = remove = pop = clear = update = _read_only
    difference_update = intersection_update = symmetric_difference_update = _read_only

    def __repr__(self) -> str:
        return f"FrozenSet({set(self)!r})" if self else "FrozenSet()"


# -- plain copies -----------------------------------------------------------------------------


def thaw(value: Any) -> Any:
    """A deep, plain, mutable copy of a value read from a snapshot or a transaction.

    Frozen containers and tree views become dict, list and set (tuples stay
    tuples), transaction wrappers their current contents. For code that wants
    builtins, or to change a copy outside any transaction.

        plain = protobase.thaw(snap.root["carts"])
    """
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, list):
        return [thaw(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return set(value)
    if isinstance(value, tuple):
        return tuple(thaw(item) for item in value)
    plain = getattr(value, "_protobase_plain_", None)  # tree views, transaction wrappers
    return thaw(plain()) if plain is not None else value


def json_default(value: Any) -> Any:
    """The `default=` for json.dumps that writes values of snapshots and transactions whole.

    json encodes FrozenDict and FrozenList itself (they are a dict and a list)
    and calls this for the rest: a tree view or transaction wrapper becomes
    the dict or list of its whole contents, a set (JSON has none) a list in
    canonical key order (a TreeSet's order, the same in every process).
    Anything else raises TypeError, as json does: a `default` of your own
    handles its types, then returns `json_default(value)`.

        json.dumps(snap.root["carts"], default=protobase.json_default)
    """
    if isinstance(value, AbstractSet):
        return sorted(value, key=order_key) if all(is_key(item) for item in value) else list(value)
    plain = getattr(value, "_protobase_plain_", None)  # tree views, transaction wrappers
    if plain is not None:
        return plain()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable; protobase.json_default "
                    f"writes ProtoBase's containers and sets: convert other types in a default= of your own, "
                    f"which then returns protobase.json_default(value)")


def freeze(value: Any) -> Any:
    """A deep read-only copy of a plain value, as a snapshot would decode it."""
    kind = type(value)
    if isinstance(value, dict):
        return FrozenDict({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return FrozenSet(value)
    if kind is tuple:
        return tuple(freeze(item) for item in value)
    plain = getattr(value, "_protobase_plain_", None)  # transaction wrappers, tree views
    return freeze(plain()) if plain is not None else value
