"""Read-only values handed out by snapshots, and their plain copies.

A snapshot returns `FrozenDict`, `FrozenList` and `FrozenSet`: subclasses of the
builtins, so reads run at C speed and `isinstance(v, dict)` holds, whose every
mutating method raises `ReadOnlyError`. Their storage is their whole contents,
so C consumers (json, `**`, `dict()`) see everything. A registered dataclass
comes back as an instance of its read-only variant: a subclass of the user's
class (so `isinstance` holds and it prints and compares like it) whose
attribute writes raise `ReadOnlyError`; a frozen dataclass is its own class.
The decoded objects live in the per-process `AtomObjectCache` and are shared
by every snapshot of the process, so nothing a user does through the public
methods may change them.

`freeze` makes a deep read-only copy of a plain value (compiled in
ccodec.c, `freeze_python` here); `thaw` makes a deep plain mutable copy of any of them (and of tree views and
transaction wrappers); `json_default` is the `default=` that lets json.dumps
write them.

Invariant: a frozen container only ever holds frozen containers, tuples,
scalars, read-only dataclass instances, or lazy views of persistent trees
(themselves read-only).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, NoReturn

from protobase import native
from protobase.errors import ReadOnlyError
from protobase.keyorder import is_key, order_key
from protobase.query.results import Queryable

__all__ = [
    "FrozenDict",
    "FrozenList",
    "FrozenSet",
    "freeze",
    "freeze_python",
    "thaw",
    "json_default",
    "READ_ONLY_HINT",
    "refuse_write",
    "dataclass_variant",
    "read_only_dataclass",
    "plain_dataclass",
    "dataclass_fields",
    "dataclass_copy",
    "is_dataclass_instance",
]

READ_ONLY_HINT = "values read from a snapshot are read-only; change them inside `with db.transaction() as tx:` instead"


def refuse_write(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    """Every mutating method of a read-only container (here and in views.py): raises ReadOnlyError."""
    raise ReadOnlyError(f"cannot modify a {type(self).__name__}: {READ_ONLY_HINT}")


class FrozenDict(Queryable, dict[Any, Any]):
    """A dict from a snapshot: reads like a dict, refuses every write."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = refuse_write
    clear = pop = popitem = setdefault = update = refuse_write

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


class FrozenList(list[Any]):
    """A list from a snapshot: reads like a list, refuses every write."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = refuse_write
    append = extend = insert = pop = remove = clear = sort = reverse = refuse_write

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))

    def __repr__(self) -> str:
        return f"FrozenList({list.__repr__(self)})"


class FrozenSet(frozenset[Any]):
    """A set from a snapshot: a frozenset that answers set's mutators with ReadOnlyError."""

    __slots__ = ()
    add = discard = remove = pop = clear = update = refuse_write
    difference_update = intersection_update = symmetric_difference_update = refuse_write

    def __repr__(self) -> str:
        return f"FrozenSet({set(self)!r})" if self else "FrozenSet()"


# -- dataclasses ------------------------------------------------------------------------------

_PLAIN_CLASS = "_protobase_dataclass_"  # attribute of a variant class: the user's dataclass it stands for


def is_dataclass_instance(value: Any) -> bool:
    """True for an instance of a dataclass (not for the class itself)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def dataclass_fields(value: Any) -> dict[str, Any]:
    """{field name -> value} of a dataclass instance: what the codec stores of it."""
    return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}


def dataclass_copy(cls: type, fields: dict[str, Any]) -> Any:
    """An instance of `cls` holding `fields`, made without calling `__init__` (as pickle does)."""
    instance: Any = object.__new__(cls)
    for name, item in fields.items():
        object.__setattr__(instance, name, item)
    return instance


def plain_dataclass(cls: type) -> type:
    """The user's dataclass a variant stands for (see dataclass_variant); `cls` itself otherwise."""
    plain: type = cls.__dict__.get(_PLAIN_CLASS, cls)
    return plain


def _field_comparison(
    cls: type, names: tuple[str, ...], compare: Callable[[Any, Any], Any]
) -> Callable[[Any, Any], Any]:
    def comparison(self: Any, other: Any) -> Any:
        if plain_dataclass(type(other)) is not cls:
            return NotImplemented
        return compare(tuple(getattr(self, name) for name in names), tuple(getattr(other, name) for name in names))

    return comparison


_ORDERINGS = (("__lt__", operator.lt), ("__le__", operator.le), ("__gt__", operator.gt), ("__ge__", operator.ge))


def dataclass_variant(cls: type, namespace: dict[str, Any]) -> type:
    """A subclass of dataclass `cls` whose instances print, compare, copy and pickle as `cls` instances do.

    The generated dataclass comparisons demand the very same class, so the
    variant brings its own: its instances equal `cls` instances (and those of
    other variants of `cls`) with equal fields. `isinstance(value, cls)`
    holds; `type(value) is cls` does not. Calling the variant, hence
    `dataclasses.replace()`, and copy and pickle make plain `cls` instances.
    `namespace` adds attributes or overrides these.
    """
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    compared = tuple(field.name for field in dataclasses.fields(cls) if field.compare)

    def new(variant: type, *args: Any, **kwargs: Any) -> Any:
        return cls(*args, **kwargs)

    def reduce(self: Any) -> tuple[Any, ...]:
        return (dataclass_copy, (cls, dataclass_fields(self)))

    body: dict[str, Any] = {
        "__slots__": (),
        "__new__": new,
        "__reduce__": reduce,
        "__hash__": cls.__hash__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        _PLAIN_CLASS: cls,
    }
    if params.eq:
        body["__eq__"] = _field_comparison(cls, compared, operator.eq)
    if params.order:
        body.update((name, _field_comparison(cls, compared, compare)) for name, compare in _ORDERINGS)
    body.update(namespace)
    return type(cls.__name__, (cls,), body)


def _refuse_attribute_write(self: Any, name: str, *value: Any) -> NoReturn:
    raise ReadOnlyError(
        f"cannot set {type(self).__name__}.{name}: {READ_ONLY_HINT} (or make a changed copy with dataclasses.replace())"
    )


@functools.cache
def read_only_dataclass(cls: type) -> type:
    """The class of the `cls` instances snapshots hand out: `cls` if frozen, else its read-only variant."""
    if cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        return cls
    return dataclass_variant(cls, {"__setattr__": _refuse_attribute_write, "__delattr__": _refuse_attribute_write})


# -- plain copies -----------------------------------------------------------------------------


def thaw(value: Any) -> Any:
    """A deep, plain, mutable copy of a value read from a snapshot or a transaction.

    Frozen containers and tree views become dict, list and set (tuples stay
    tuples), dataclasses plain instances of their own class, transaction
    wrappers their current contents. For code that wants builtins, or to
    change a copy outside any transaction.

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
    if is_dataclass_instance(value):
        fields = {name: thaw(item) for name, item in dataclass_fields(value).items()}
        return dataclass_copy(plain_dataclass(type(value)), fields)
    plain = getattr(value, "_protobase_plain_", None)  # tree views, transaction wrappers
    return thaw(plain()) if plain is not None else value


def json_default(value: Any) -> Any:
    """The `default=` for json.dumps that writes values of snapshots and transactions whole.

    json encodes FrozenDict and FrozenList itself (they are a dict and a list)
    and calls this for the rest: a tree view or transaction wrapper becomes
    the dict or list of its whole contents, a set (JSON has none) a list in
    canonical key order (a TreeSet's order, the same in every process), a
    dataclass the dict of its fields. Anything else raises TypeError, as json
    does: a `default` of your own handles its types, then returns
    `json_default(value)`.

        json.dumps(snap.root["carts"], default=protobase.json_default)
    """
    if isinstance(value, AbstractSet):
        return sorted(value, key=order_key) if all(is_key(item) for item in value) else list(value)
    if is_dataclass_instance(value):
        return dataclass_fields(value)
    plain = getattr(value, "_protobase_plain_", None)  # tree views, transaction wrappers
    if plain is not None:
        return plain()
    raise TypeError(
        f"Object of type {type(value).__name__} is not JSON serializable; protobase.json_default "
        f"writes ProtoBase's containers, sets and dataclasses: convert other types in a default= "
        f"of your own, which then returns protobase.json_default(value)"
    )


def freeze_python(value: Any) -> Any:
    """A deep read-only copy of a plain value, as a snapshot would decode it: the oracle of ccodec.freeze."""
    kind = type(value)
    if isinstance(value, dict):
        return FrozenDict({key: freeze_python(item) for key, item in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze_python(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return FrozenSet(value)
    if kind is tuple:
        return tuple(freeze_python(item) for item in value)
    if is_dataclass_instance(value):  # a copy: the caller keeps its own instance, and may change it
        cls = read_only_dataclass(plain_dataclass(kind))
        return dataclass_copy(cls, {name: freeze_python(item) for name, item in dataclass_fields(value).items()})
    plain = getattr(value, "_protobase_plain_", None)  # transaction wrappers, tree views
    return freeze_python(plain()) if plain is not None else value


_compiled = native.load("protobase.core.ccodec")
if _compiled is not None:
    _compiled.configure_frozen(FrozenDict, FrozenList, FrozenSet, freeze_python)
    freeze: Callable[[Any], Any] = _compiled.freeze  # copies plain data in C, hands the rest to freeze_python
else:
    freeze = freeze_python
