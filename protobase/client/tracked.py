"""Tracked copies: small lists, sets and registered dataclasses read in a transaction, written back whole.

Owns the mutable stand-ins a transaction hands out for a snapshot's small
(inline) containers and mutable dataclasses: a deep copy whose every part
reports a change to the container's owner, which records the container as
written whole at its path (a tree list's element reports to its TxList
instead, see txvalues.py). Runs in client processes.

Invariant: a tracked copy never aliases the snapshot's frozen objects, which
every reader of this process shares; every change to it, at any depth, is
validated on the line that made it and reaches its owner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from protobase.client.writeset import WriteSet, validate
from protobase.core.frozen import (
    dataclass_copy,
    dataclass_fields,
    dataclass_variant,
    is_dataclass_instance,
    plain_dataclass,
    thaw,
)
from protobase.core.views import TreeDict, TreeList, TreeSet
from protobase.errors import EncodingError, format_path
from protobase.wire.opcodes import OP_SET

__all__ = [
    "ChangeListener",
    "Owner",
    "TrackedDict",
    "TrackedList",
    "TrackedSet",
    "track",
    "is_mutable_dataclass",
    "tracked_whole",
]


class ChangeListener(Protocol):
    """What a tracked copy tells of a change inside it: the owner of the whole container."""

    def __call__(self) -> None: ...


class Owner:
    """Records a small container as written whole, at its path, when anything inside it changes."""

    __slots__ = ("writes", "path", "container")

    def __init__(self, writes: WriteSet, path: tuple[Any, ...]) -> None:
        self.writes = writes
        self.path = path  # where the container sits in the root
        self.container: Any = None  # the tracked container, set once built

    def __call__(self) -> None:
        self.writes.record(self.path, OP_SET, self.container)  # (refused once the transaction ended)

    def release(self) -> None:
        """Let go of the container (which holds this owner): the transaction ended (WriteSet.release)."""
        self.container = None


def _notify(method: Callable[..., Any]) -> Callable[..., Any]:
    def mutator(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        validate(self, self._path)  # a bad value fails on the line that stored it
        self._owner()
        return result

    mutator.__name__ = method.__name__
    return mutator


class TrackedDict(dict[Any, Any]):
    """A dict inside a small list or set read in a transaction; changes mark the container written."""

    __slots__ = ("_owner", "_path")

    def _protobase_plain_(self) -> dict[Any, Any]:
        return dict(self)


class TrackedList(list[Any]):
    """A small list read in a transaction; any change rewrites it whole."""

    __slots__ = ("_owner", "_path")

    def _protobase_plain_(self) -> list[Any]:
        return list(self)


class TrackedSet(set[Any]):
    """A small set read in a transaction; any change rewrites it whole."""

    __slots__ = ("_owner", "_path")

    def _protobase_plain_(self) -> set[Any]:
        return set(self)


_cls: type
_base: type
for _cls, _base, _names in (
    (TrackedDict, dict, "__setitem__ __delitem__ __ior__ clear pop popitem setdefault update"),
    (TrackedList, list, "__setitem__ __delitem__ __iadd__ __imul__ append extend insert pop remove clear sort reverse"),
    (
        TrackedSet,
        set,
        "__ior__ __iand__ __isub__ __ixor__ add discard remove pop clear update "
        "difference_update intersection_update symmetric_difference_update",
    ),
):
    for _name in _names.split():
        setattr(_cls, _name, _notify(getattr(_base, _name)))


def is_mutable_dataclass(value: Any) -> bool:
    """True for an instance of a registered dataclass that is not frozen: a transaction tracks it."""
    return is_dataclass_instance(value) and not value.__dataclass_params__.frozen


def _set_tracked_attribute(self: Any, name: str, value: Any) -> None:
    cls: Any = plain_dataclass(type(self))
    cls.__setattr__(self, name, value)  # the class's own (object's, or the user's)
    validate(self, self._tx_path_)  # a bad value fails on the line that stored it
    self._tx_owner_()


def _refuse_attribute_deletion(self: Any, name: str) -> None:
    raise EncodingError(
        f"cannot delete attribute {name!r} of the {type(self).__name__} at "
        f"{format_path(self._tx_path_)}: a stored dataclass keeps every field; set it to None instead"
    )


def _plain_dataclass_copy(self: Any) -> Any:
    return dataclass_copy(plain_dataclass(type(self)), dataclass_fields(self))


@functools.cache
def _tracked_dataclass(cls: type) -> type:
    """The class of `cls` instances read in a transaction: attribute changes report to the instance's owner."""
    return dataclass_variant(
        cls,
        {
            "__slots__": ("_tx_owner_", "_tx_path_"),
            "__setattr__": _set_tracked_attribute,
            "__delattr__": _refuse_attribute_deletion,
            "_protobase_plain_": _plain_dataclass_copy,
        },
    )


def track(value: Any, owner: ChangeListener, path: tuple[Any, ...]) -> Any:
    """A tracked mutable deep copy of a frozen small container or dataclass; every part reports to `owner`."""
    if isinstance(value, (dict, TreeDict)):
        tracked: Any = TrackedDict((key, track(item, owner, path + (key,))) for key, item in value.items())
    elif isinstance(value, (list, TreeList)):
        tracked = TrackedList(track(item, owner, path + (index,)) for index, item in enumerate(value))
    elif isinstance(value, (set, frozenset, TreeSet)):
        tracked = TrackedSet(value)
    elif isinstance(value, tuple):
        return thaw(value)
    elif is_mutable_dataclass(value):
        fields = {name: track(item, owner, path + (name,)) for name, item in dataclass_fields(value).items()}
        tracked = dataclass_copy(_tracked_dataclass(plain_dataclass(type(value))), fields)
        object.__setattr__(tracked, "_tx_owner_", owner)
        object.__setattr__(tracked, "_tx_path_", path)
        return tracked
    else:
        return value
    tracked._owner = owner
    tracked._path = path
    return tracked


def tracked_whole(value: Any) -> bool:
    """True for an element a TxList copies tracked, so that a change inside it rewrites the element."""
    return isinstance(value, (dict, list, set, frozenset, TreeDict)) or is_mutable_dataclass(value)
