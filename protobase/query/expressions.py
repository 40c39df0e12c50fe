"""Query conditions: `F` builds them, `Expr.matches` decides them on one record.

Owns what a condition means, with or without an index:
`(F.city == "Paris") & (F.score > 5) | F.tags.contains("vip")` is a tree of
`Expr` nodes (Compare, Range, In, Contains, And, Or, Not, Everything). The
planner reads their fields to pick indexes; `matches` is the reference
semantics every plan must agree with:

* a record lacking the field matches no comparison but `!=`;
* values Python cannot compare (5 < "a") do not match;
* `contains` is membership in a list, tuple or set value (or a tree list or
  set, which declare `_index_elements_`).

Runs in whichever process queries. Expressions are immutable once built; `&`
and `|` flatten nested And / Or, and `and` / `or` / `not` raise TypeError
(a condition has no truth value), as does `F.x in values`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, Final

from protobase.query.fields import MISSING, FieldPath, field_name, field_value

__all__ = [
    "F",
    "Field",
    "Expr",
    "Compare",
    "Range",
    "In",
    "Contains",
    "And",
    "Or",
    "Not",
    "Everything",
    "OPEN",
    "values_equal",
]


class Expr:
    """A condition on records; combine with & | ~."""

    def matches(self, record: Any) -> bool:
        """Whether `record` satisfies the condition."""
        raise NotImplementedError

    def __and__(self, other: Expr) -> Expr:
        return And(_parts(self, And) + _parts(other, And))

    def __or__(self, other: Expr) -> Expr:
        return Or(_parts(self, Or) + _parts(other, Or))

    def __invert__(self) -> Expr:
        return Not(self)

    def __bool__(self) -> bool:
        raise TypeError("use & | ~ to combine query conditions, not and / or / not")


def _parts(expr: Expr, kind: type[And] | type[Or]) -> list[Expr]:
    """The terms `expr` adds to a `kind` junction: its own parts when it is one, else itself."""
    if not isinstance(expr, Expr):
        raise TypeError(f"cannot combine a query condition with {expr!r}")
    return list(expr.parts) if type(expr) is kind else [expr]


_COMPARE: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class Compare(Expr):
    """field <op> value."""

    def __init__(self, path: FieldPath, op: str, value: Any) -> None:
        self.path, self.op, self.value = path, op, value

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        if found is MISSING:
            return self.op == "!="
        try:
            return bool(_COMPARE[self.op](found, self.value))
        except TypeError:
            return self.op == "!="

    def __bool__(self) -> bool:
        if self.op in ("==", "!="):  # what `F.x in [1, 2]` asks of each `element == F.x`
            field = Field(self.path)
            raise TypeError(
                f"a query condition has no truth value: to test membership use {field!r}.isin(values) "
                f"(`{field!r} in values` cannot build a condition); to combine conditions use & | ~, "
                f"not and / or / not"
            )
        return super().__bool__()

    def __repr__(self) -> str:
        return f"{field_name(self.path)} {self.op} {self.value!r}"


class _Open:
    """An open side of a range (None is a value: `F.x > None` matches nothing, as in Python)."""

    def __repr__(self) -> str:
        return "OPEN"


OPEN: Final = _Open()


class Range(Expr):
    """low <(=) field <(=) high; an OPEN side is unbounded."""

    def __init__(self, path: FieldPath, low: Any, high: Any, include_low: bool, include_high: bool) -> None:
        self.path, self.low, self.high = path, low, high
        self.include_low, self.include_high = include_low, include_high

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        if found is MISSING:
            return False
        try:
            if self.low is not OPEN and not (found >= self.low if self.include_low else found > self.low):
                return False
            return self.high is OPEN or bool(found <= self.high if self.include_high else found < self.high)
        except TypeError:
            return False

    def bounds(self) -> tuple[Any, Any]:
        """(low, high) with None for an open side, as index readers take them."""
        return (None if self.low is OPEN else self.low), (None if self.high is OPEN else self.high)

    def __repr__(self) -> str:
        low = "" if self.low is OPEN else f"{self.low!r} {'<=' if self.include_low else '<'} "
        high = "" if self.high is OPEN else f" {'<=' if self.include_high else '<'} {self.high!r}"
        return f"{low}{field_name(self.path)}{high}"


class In(Expr):
    """field equals one of values."""

    def __init__(self, path: FieldPath, values: tuple[Any, ...]) -> None:
        self.path, self.values = path, values

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        return found is not MISSING and any(values_equal(found, value) for value in self.values)

    def __repr__(self) -> str:
        return f"{field_name(self.path)} in {list(self.values)!r}"


class Contains(Expr):
    """field is a list, tuple or set holding value."""

    def __init__(self, path: FieldPath, value: Any) -> None:
        self.path, self.value = path, value

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        if isinstance(found, (list, tuple, set, frozenset)) or getattr(found, "_index_elements_", False):
            try:
                return self.value in found
            except TypeError:
                return False
        return False

    def __repr__(self) -> str:
        return f"{self.value!r} in {field_name(self.path)}"


class And(Expr):
    """Every part holds."""

    def __init__(self, parts: list[Expr]) -> None:
        self.parts = parts

    def matches(self, record: Any) -> bool:
        return all(part.matches(record) for part in self.parts)

    def __repr__(self) -> str:
        return " & ".join(f"({part!r})" for part in self.parts)


class Or(Expr):
    """At least one part holds."""

    def __init__(self, parts: list[Expr]) -> None:
        self.parts = parts

    def matches(self, record: Any) -> bool:
        return any(part.matches(record) for part in self.parts)

    def __repr__(self) -> str:
        return " | ".join(f"({part!r})" for part in self.parts)


class Not(Expr):
    """The part does not hold."""

    def __init__(self, part: Expr) -> None:
        self.part = part

    def matches(self, record: Any) -> bool:
        return not self.part.matches(record)

    def __repr__(self) -> str:
        return f"~({self.part!r})"


class Everything(Expr):
    """Every record: the condition of `where()` without one."""

    def matches(self, record: Any) -> bool:
        return True

    def __repr__(self) -> str:
        return "everything"


def values_equal(a: Any, b: Any) -> bool:
    """`a == b`, False where Python refuses to compare them."""
    try:
        return bool(a == b)
    except TypeError:
        return False


class Field:
    """A field of the records: `F.city`, `F.address.city`, `F["odd key"]`."""

    __slots__ = ("path",)

    def __init__(self, path: FieldPath) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Field:
        if name.startswith("__"):
            raise AttributeError(name)
        return Field(self.path + (name,))

    def __getitem__(self, name: Any) -> Field:
        return Field(self.path + (name,))

    def __eq__(self, value: object) -> Expr:  # type: ignore[override]
        return Compare(self.path, "==", value)

    def __ne__(self, value: object) -> Expr:  # type: ignore[override]
        return Compare(self.path, "!=", value)

    def __lt__(self, value: Any) -> Expr:
        return Range(self.path, OPEN, value, False, False)

    def __le__(self, value: Any) -> Expr:
        return Range(self.path, OPEN, value, False, True)

    def __gt__(self, value: Any) -> Expr:
        return Range(self.path, value, OPEN, False, False)

    def __ge__(self, value: Any) -> Expr:
        return Range(self.path, value, OPEN, True, False)

    def between(self, low: Any, high: Any) -> Expr:
        """low <= field <= high (a None bound matches nothing, as Python cannot compare with None)."""
        return Range(self.path, low, high, True, True)

    def isin(self, values: Iterable[Any]) -> Expr:
        """field equals one of `values`."""
        return In(self.path, tuple(values))

    def contains(self, value: Any) -> Expr:
        """field is a list, tuple or set that holds `value`."""
        return Contains(self.path, value)

    def __hash__(self) -> int:  # what `F.x in {1, 2}` asks first
        raise TypeError(
            f"a query field cannot be hashed: to test membership use {self!r}.isin(values), not `{self!r} in values`"
        )

    def __repr__(self) -> str:
        return f"F.{field_name(self.path)}"


class _FieldRoot:
    """`F.name` starts a field; see Field."""

    def __getattr__(self, name: str) -> Field:
        if name.startswith("__"):
            raise AttributeError(name)
        return Field((name,))

    def __getitem__(self, name: Any) -> Field:
        return Field((name,))

    def __repr__(self) -> str:
        return "F"


F: Final = _FieldRoot()
