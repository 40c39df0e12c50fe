"""LocalDict: a dict assigned in a transaction, read back through `tx.root`.

Owns how a transaction hands back a dict it stored itself: the user's own
dict, wrapped only to validate what is stored into it, to answer queries and
to record index operations to run after it is written. Runs in client
processes.

Invariant: changes go straight into the assigned dict, which the
transaction stores whole at commit (the op recorded at assignment); nothing
else is recorded for them.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

from protobase.client.writeset import WriteSet, check_increment, index_name, validate
from protobase.keyorder import check_key
from protobase.query.results import Queryable
from protobase.wire.opcodes import OP_CREATE_INDEX, OP_DROP_INDEX

__all__ = ["LocalDict"]


class LocalDict(Queryable, MutableMapping[Any, Any]):
    """A dict assigned in this transaction, read back through `tx.root`: the dict itself, plus queries.

    Changes go straight into the assigned dict, which the transaction stores
    whole at commit; `create_index` on it is recorded to run after that.
    """

    __slots__ = ("_writes", "_path", "_dict")

    def __init__(self, writes: WriteSet, path: tuple[Any, ...], value: dict[Any, Any]) -> None:
        self._writes = writes  # of the transaction that assigned it
        self._path = path
        self._dict = value  # the user's dict, stored at commit

    @property
    def _protobase_path_(self) -> tuple[Any, ...]:
        """The key path of the dict this wraps (codec.validate refuses a wrapper stored below it)."""
        return self._path

    def __getitem__(self, key: Any) -> Any:
        value = self._dict[key]
        return LocalDict(self._writes, self._path + (key,), value) if type(value) is dict else value

    def __setitem__(self, key: Any, value: Any) -> None:
        self._writes.check_active()
        check_key(key, self._path + (key,))
        validate(value, self._path + (key,))
        self._dict[key] = value

    def incr(self, key: Any, n: int | float = 1) -> None:
        """Add `n` to the number at `key` (0 if missing), in this dict, which is stored whole at commit."""
        self._writes.check_active()
        check_key(key, self._path + (key,))
        check_increment(n)
        current = self._dict.get(key, 0)
        if type(current) is not int and type(current) is not float:
            raise TypeError(f"incr() adds to a number, but {self._path + (key,)!r} holds a {type(current).__name__}")
        self._dict[key] = current + n

    def __delitem__(self, key: Any) -> None:
        self._writes.check_active()
        del self._dict[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def create_index(self, *fields: str) -> None:
        self._writes.record_index_op(self._path, OP_CREATE_INDEX, index_name(fields))

    def drop_index(self, *fields: str) -> None:
        self._writes.record_index_op(self._path, OP_DROP_INDEX, index_name(fields))

    def _protobase_plain_(self) -> dict[Any, Any]:
        return self._dict

    def __eq__(self, other: object) -> bool:
        return self._dict == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._dict)
