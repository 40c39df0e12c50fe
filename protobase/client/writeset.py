"""A transaction's write set: the operations recorded at key paths, the paths read, and its state.

Owns what the wrappers of a transaction (txvalues.py, tracked.py, local.py)
report to it and what its commit sends: one operation per key path, the last
write winning, kept in the order of last writes so that they replay as the
user made them; with serializable isolation, the paths read; and the state
(active, committing, committed, aborted, unknown) that decides whether the
wrappers may still be used. Runs in client processes, in the thread of the
transaction.

Invariant: each path holds one op, `[code, path, argument]`; a wrapper whose
element operations are collected at commit is recorded as DEFERRED with a
callable returning them, and the SETs of many keys at once (`update`) as one
entry holding them, so recording stays O(1) per change. Once the
transaction ended, `release` leaves no reference cycle among the write set and
its wrappers.

Also the checks every stored value goes through at assignment (`validate`),
so a bad value fails on the line that stored it, the check of an increment's
amount (`check_increment`) and index-name validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from protobase.core import codec
from protobase.errors import DatabaseClosedError
from protobase.keyorder import check_key
from protobase.query.fields import field_path
from protobase.wire.opcodes import INCR_LIMIT, OP_SET

__all__ = ["WriteSet", "Releasable", "DEFERRED", "INDEX_OP", "validate", "check_increment", "index_name"]

DEFERRED = 0  # op code of a tree list/set wrapper whose ops are collected at commit
INDEX_OP = object()  # first element of the `ops` key of an index operation
MERGE_OP = object()  # first element of the `ops` key of the SETs of many keys at once (record_sets)


def validate(value: Any, path: tuple[Any, ...]) -> None:
    """Raise EncodingError, naming `path`, unless `value` can be stored (its keys included)."""
    if codec.storable(value, len(path)):
        return  # plain data, checked by the compiled core in one walk
    codec.validate(value, path)
    check_keys(value, path)


def check_keys(value: Any, path: tuple[Any, ...]) -> None:
    """Raise EncodingError unless every dict key and set element in `value` may be a stored key."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_key(key, path + (key,))
            check_keys(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_keys(item, path + (index,))
    elif isinstance(value, (set, frozenset)):
        for item in value:
            check_key(item, path)


def check_increment(n: object) -> None:
    """TypeError unless `n` is an amount `incr` accepts: an int of 64 bits or a finite float (not a bool)."""
    if type(n) is int and -INCR_LIMIT < n < INCR_LIMIT:
        return
    if type(n) is float and n - n == 0:  # finite (inf - inf and nan - nan are nan)
        return
    raise TypeError(f"incr() adds an int of 64 bits or a finite float, got {n!r}")


def index_name(fields: tuple[Any, ...]) -> str | tuple[str, ...]:
    """ "city" for one field, ("city", "score") for a composite index; TypeError for a bad name."""
    if not fields:
        raise TypeError("create_index() needs at least one field name, e.g. create_index('city')")
    for field in fields:
        if not isinstance(field, str):
            raise TypeError(f"index fields are dotted names like 'address.city', got {field!r}")
        field_path(field)  # validates the name
    return fields[0] if len(fields) == 1 else tuple(fields)


class WriteSet:
    """The ops, reads and state of one transaction, as its wrappers record them."""

    __slots__ = ("serializable", "ops", "reads", "state", "owners", "merges")

    def __init__(self, serializable: bool) -> None:
        self.serializable = serializable  # record reads too
        self.ops: dict[Any, list[Any]] = {}  # {path (or index key) -> [code, path, argument]}, in order of last write
        self.reads: set[tuple[Any, ...]] = set()  # paths read (serializable only)
        self.state = "active"  # "active", "committing", "committed", "aborted" or "unknown"
        self.owners: list[Releasable] = []  # owners of the tracked copies handed out, cut loose by `release`
        self.merges = 0  # entries `record_sets` made, each its own key

    def check_active(self) -> None:
        """DatabaseClosedError unless the transaction may still be read and written."""
        # "committing": the commit reads its own values back (write-through), nothing else runs then.
        if self.state != "active" and self.state != "committing":
            raise DatabaseClosedError(f"this transaction is {self.state}; start a new one with db.transaction()")

    def record(self, path: tuple[Any, ...], code: int, argument: Any) -> None:
        """Record `[code, path, argument]` as the op at `path`, replacing an earlier one."""
        self.check_active()
        self.ops.pop(path, None)  # re-insert: ops replay in the order of their last write
        self.ops[path] = [code, path, argument]

    def record_sets(self, parent: tuple[Any, ...], items: dict[Any, Any]) -> None:
        """Record `SET parent + (key,) = value` for every item of `items` (which this write set then owns).

        One entry for them all, whose SETs `wire_ops` makes at commit: a
        million records once cost a million entries, 1.8 s here and as long
        again to list them (cProfile). The commit leaves what setting each
        key would: a key set before keeps its earlier op, which this one
        follows and overrides; a key set after follows this one.
        """
        self.check_active()
        key = (MERGE_OP, parent, self.merges)
        self.merges += 1
        self.ops[key] = [OP_SET, parent, items]

    def record_deferred(self, path: tuple[Any, ...], wire_ops: Callable[[], list[Any]]) -> None:
        """Record that the container at `path` has element ops, which `wire_ops()` returns at commit."""
        self.record(path, DEFERRED, wire_ops)

    def record_index_op(self, path: tuple[Any, ...], code: int, field: str | tuple[str, ...]) -> None:
        """Record creating or dropping the index `field` of the collection at `path`."""
        if not path:
            raise ValueError("the root itself cannot be indexed; index a collection inside it, e.g. root['users']")
        self.record((INDEX_OP, path, field), code, field)

    def read(self, path: tuple[Any, ...]) -> None:
        """Note that `path` was read (serializable isolation validates it at commit)."""
        if self.serializable:
            self.reads.add(path)

    def keys_written_below(self, path: tuple[Any, ...]) -> set[Any]:
        """The keys of the mapping at `path` that an op was recorded at, or inside."""
        depth = len(path)
        found: set[Any] = set()
        for key, (_, op_path, argument) in self.ops.items():
            if key and key[0] is MERGE_OP:
                if op_path == path:
                    found.update(argument or ())  # the keys `record_sets` set (none once released)
                    continue
                key = op_path
            if key and key[0] is not INDEX_OP and len(key) > depth and key[:depth] == path:
                found.add(key[depth])
        return found

    def wire_ops(self) -> list[Any]:
        """The ops as the commit request sends them: `[code, [key, ...], argument]`, in order."""
        ops: list[Any] = []
        for key, (code, path, argument) in self.ops.items():
            if code == DEFERRED:
                ops.extend(argument())
            elif key and key[0] is MERGE_OP:
                parent = list(path)
                ops.extend([OP_SET, [*parent, item], value] for item, value in argument.items())
            elif key and key[0] is INDEX_OP:
                ops.append([code, list(key[1]), argument])
            else:
                ops.append([code, list(path), argument])
        return ops

    def own(self, owner: Releasable) -> None:
        """Remember the owner of a tracked copy handed out, so that `release` can cut it loose."""
        self.owners.append(owner)

    def release(self) -> None:
        """Once the transaction has ended: let go of the wrappers, so that none of them is cyclic garbage.

        A tracked copy and its owner refer to each other, a tree list or set
        wrapper is held here by the method that lists its ops, and a written
        copy is held here while its owner holds this write set: cycles only
        the cyclic GC would free, a few per transaction. Cut here (each op
        keeps its code and path, and `len()` still counts them), reference
        counting frees them with the last wrapper the user drops. Idempotent;
        the wrappers refuse to be used from then on, as `state` says.
        """
        assert self.state not in ("active", "committing"), "a write set is released once its transaction ended"
        for op in self.ops.values():
            op[2] = None
        for owner in self.owners:
            owner.release()
        self.owners = []

    def __len__(self) -> int:
        return len(self.ops)


class Releasable(Protocol):
    """The owner of a tracked copy (tracked.py, txvalues.py): it lets go of the copy when told."""

    def release(self) -> None: ...
