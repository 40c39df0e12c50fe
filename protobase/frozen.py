"""Read-only values handed out by snapshots.

A snapshot returns `FrozenDict`, `FrozenList` and `FrozenSet`: subclasses of the
builtins, so reads run at C speed and `isinstance(v, dict)` holds, whose every
mutating method raises `ReadOnlyError`. The decoded objects live in the
per-process `AtomObjectCache` and are shared by every snapshot of the process,
so nothing a user does through the public methods may change them.

Invariant: a frozen container only ever holds frozen containers, tuples,
scalars, or lazy views of persistent trees (themselves read-only).
"""

from __future__ import annotations

from typing import Any, NoReturn

from .errors import ReadOnlyError

__all__ = ["FrozenDict", "FrozenList", "FrozenSet", "freeze", "thaw", "READ_ONLY_HINT"]

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


def thaw(value: Any) -> Any:
    """A deep, plain, mutable copy of a frozen value (dict, list, set; tuples stay tuples)."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, list):
        return [thaw(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return set(value)
    if isinstance(value, tuple):
        return tuple(thaw(item) for item in value)
    thaw_method = getattr(value, "thaw", None)
    return thaw_method() if thaw_method is not None else value


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
