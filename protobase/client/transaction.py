"""Transactions: a private, mutable view of one snapshot that records its writes.

Owns how user mutations become operations at key paths. `tx.root` is a
`TxDict`; reading a container through it hands out a wrapper that records
every change: dicts at key-addressable paths record key-level writes (so two
transactions writing different keys of one record do not conflict); small
lists and sets, and anything inside them, are recorded as a whole new value
for their path; large (tree) lists and sets record element operations, so the
coordinator writes O(log n) atoms for them too.

A registered dataclass read through a transaction is a tracked copy whose
attribute changes (and changes inside its fields) rewrite it whole at its
path, as a small list's do.

Values are encoded at commit, not at assignment: what a write stores is the
state of the object when the transaction commits, as with a plain dict.
Assignments are validated at once, so a bad value fails on the line that
stored it.

Invariant: the wrappers never change the snapshot's frozen objects, which are
shared with every other reader of this process.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, MutableSequence, MutableSet
from typing import TYPE_CHECKING, Any

from protobase.core import codec
from protobase.core.frozen import (
    FrozenDict,
    FrozenList,
    FrozenSet,
    dataclass_copy,
    dataclass_fields,
    dataclass_variant,
    is_dataclass_instance,
    plain_dataclass,
    thaw,
)
from protobase.core.views import IndexedTreeDict, TreeDict, TreeList, TreeSet
from protobase.errors import DatabaseClosedError, EncodingError, OutcomeUnknownError, ProtoBaseError, format_path
from protobase.keyorder import check_key
from protobase.query import Expr, IndexReader, Query
from protobase.query.fields import field_path
from protobase.query.source import NO_INDEXES, IndexName
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_DELETE,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_DROP_INDEX,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)

if TYPE_CHECKING:
    from protobase.client.session import CommitRequest, Session

__all__ = ["Transaction", "TxDict", "TxList", "TxSet", "ISOLATION_LEVELS"]

ISOLATION_LEVELS = ("snapshot", "serializable")
_DELETED = object()  # marks a key deleted in this transaction
_DEFERRED = 0  # op code of a tree list/set wrapper whose ops are collected at commit


def _validate(value: Any, path: tuple) -> None:
    codec.validate(value, path)
    _check_keys(value, path)


def _check_keys(value: Any, path: tuple) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            check_key(key, path + (key,))
            _check_keys(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_keys(item, path + (index,))
    elif isinstance(value, (set, frozenset)):
        for item in value:
            check_key(item, path)


class Transaction:
    """One transaction: a snapshot, the writes made on top of it, and (serializable) its reads."""

    def __init__(self, session: Session, isolation: str = "snapshot", durability: str | None = None) -> None:
        if isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, got {isolation!r}")
        self._session = session
        self.isolation = isolation
        self.serializable = isolation == "serializable"
        self.durability = durability  # None: the database handle's default
        self.base_seq, root, self._epoch = session.pin()
        self.seq: int | None = None  # sequence number of the commit, once committed
        self._request: CommitRequest | None = None  # the commit sent, until its answer is recorded
        self._refusal: BaseException | None = None  # why the commit was refused (nothing committed)
        self._pinned = True  # base_seq is pinned in the handle's reader slot
        self._ops: dict[tuple, list] = {}  # {path -> [code, path, argument]}, in order of last write
        self._reads: set[tuple] = set()  # paths read (serializable only)
        self._state = "active"
        self.root = TxDict(self, (), root)

    # -- recording (called by the wrappers) --------------------------------------

    def _check_active(self) -> None:
        # "committing": the commit reads its own values back (write-through), nothing else runs then.
        if self._state != "active" and self._state != "committing":
            raise DatabaseClosedError(f"this transaction is {self._state}; start a new one with db.transaction()")

    def _record(self, path: tuple, code: int, argument: Any) -> None:
        self._check_active()
        self._ops.pop(path, None)  # re-insert: ops replay in the order of their last write
        self._ops[path] = [code, path, argument]

    def _read(self, path: tuple) -> None:
        if self.serializable:
            self._reads.add(path)

    def _adopt(self, path: tuple, value: Any) -> Any:
        """The transaction's mutable stand-in for a snapshot value read at `path`."""
        kind = type(value)
        if kind is FrozenDict or kind is TreeDict or kind is IndexedTreeDict:
            return TxDict(self, path, value)
        if kind is FrozenList or kind is FrozenSet or _is_mutable_dataclass(value):
            owner = _Owner(self, path)
            owner.container = _track(value, owner, path)
            return owner.container
        if kind is TreeList:
            return TxList(self, path, value)
        if kind is TreeSet:
            return TxSet(self, path, value)
        if kind is tuple:
            return thaw(value)
        return value

    # -- ending -----------------------------------------------------------------

    def commit(self) -> int:
        """Send the writes to the coordinator; return the commit's sequence number.

        Raises ConflictError when another commit changed what this one wrote
        (or, serializable, read) since its snapshot: run it again. If the wait
        for the answer is interrupted (Ctrl-C), the transaction is left in
        state "unknown": the coordinator may still commit it, and `outcome()`
        tells. OutcomeUnknownError means the connection was lost before the
        answer came.
        """
        self._check_active()
        try:
            ops = self._wire_ops()
            if not ops:
                self.seq = self.base_seq
                return self.seq
            reads = [list(path) for path in self._reads] if self.serializable else []
            request = self._session.prepare_commit(self._epoch, self.base_seq, self.serializable, self.durability,
                                                   ops, reads, self._check_encodable)
            self._request = request
            self._state = "committing"  # from here on, the coordinator may commit it
            self._session.send_commit(request)
            return self._await(None)
        except ProtoBaseError as error:  # the session maps the socket's OSErrors to these
            if not isinstance(error, OutcomeUnknownError):
                self._refusal = error  # refused, or never sent: nothing was committed
            raise
        finally:
            self._settle()

    def outcome(self, timeout: float | None = None) -> int | None:
        """The sequence number this transaction committed as, once the coordinator's answer is known.

        For a commit whose wait was interrupted (state "unknown"): waits up to
        `timeout` seconds (None: until it comes) for the answer the coordinator
        still sends, and returns the seq, or None if none came in time. Raises
        the ConflictError (or other error) the commit got, and
        OutcomeUnknownError if the connection it went out on is lost. For a
        committed transaction it is `seq`; for a refused one, the error it got
        is raised again; an active one, or one aborted before its commit went
        out, raises DatabaseClosedError.
        """
        if self._state in ("committing", "unknown") and self._answer_may_come():
            try:
                self._await(timeout)
            except ProtoBaseError as error:
                if not isinstance(error, OutcomeUnknownError):
                    self._refusal = error
                raise
            finally:
                self._settle()
        elif self._state in ("committing", "unknown"):
            self._settle()  # an interruption came between learning the answer and recording it
        if self._state == "committed":
            return self.seq
        if self._state == "unknown":
            return None
        if self._refusal is not None:
            raise self._refusal
        raise DatabaseClosedError(f"this transaction is {self._state}: nothing of it was committed")

    def _await(self, timeout: float | None) -> int | None:
        self.seq = self._session.await_commit(self._request, timeout)
        return self.seq

    def _answer_may_come(self) -> bool:
        return (self.seq is None and self._refusal is None and self._request is not None
                and self._request.may_have_been_sent)

    def _settle(self) -> None:
        """Committed, aborted, or (a commit sent whose answer is still to come) unknown.

        Decided from facts recorded as they are learnt (`seq`, `_refusal`,
        what was sent), so an interruption at any point leaves a state that
        `outcome()` can finish.
        """
        if self.seq is not None:
            self._finish("committed")
        elif self._answer_may_come():
            self._finish("unknown")
        else:
            self._finish("aborted")

    def _wire_ops(self) -> list:
        ops = []
        for key, (code, path, argument) in self._ops.items():
            if code == _DEFERRED:
                ops.extend(argument._wire_ops())
            elif key and key[0] is _INDEX_OP:
                ops.append([code, list(key[1]), argument])
            else:
                ops.append([code, list(path), argument])
        return ops


    def _check_encodable(self, ops: list) -> None:
        for code, path, argument in ops:
            if code == OP_SET:
                _validate(argument, tuple(path))

    def abort(self) -> None:
        """Drop every write; the transaction ends."""
        if self._state == "active":
            self._finish("aborted")

    def _finish(self, state: str) -> None:
        self._state = state
        if self._pinned:
            # Flag first: an interruption between the two leaks a pin (memory held a
            # while longer), never unpins twice (which could free another snapshot's).
            self._pinned = False
            self._session.unpin(self.base_seq, self._epoch)  # what it read no longer matters
        if state != "unknown":
            request, self._request = self._request, None
            if request is not None:
                request.release()  # last: interrupted before it, the answer just stays parked a while

    @property
    def active(self) -> bool:
        return self._state == "active"

    @property
    def state(self) -> str:
        """"active", "committed", "aborted", or "unknown": its commit was sent and the answer has not come.

        A commit whose wait was interrupted (Ctrl-C) is "unknown" until
        `outcome()` collects the coordinator's answer.
        """
        return "unknown" if self._state == "committing" else self._state

    def __del__(self) -> None:
        # A forgotten transaction must not pin shared memory for the life of the process.
        try:
            self.abort()
        except Exception:  # interpreter shutdown: the database may be gone already
            pass

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<Transaction {self._state} base_seq={self.base_seq} writes={len(self._ops)}>"


# codec.validate refuses a wrapper stored below its own path (it would contain itself): the wrappers
# build their contents on demand, so only their path can tell.
_wrapper_path = property(operator.attrgetter("_path"), doc="The key path of the container this wraps.")


class TxDict(MutableMapping):
    """A dict inside a transaction: reads its snapshot value, records key-level writes."""

    __slots__ = ("_tx", "_path", "_base", "_local", "_children")
    _protobase_path_ = _wrapper_path

    def __init__(self, tx: Transaction, path: tuple, base: Any) -> None:
        self._tx = tx
        self._path = path  # key path from the root
        self._base = base  # FrozenDict or TreeDict of the snapshot
        self._local: dict = {}  # {key -> value or _DELETED} written in this transaction
        self._children: dict = {}  # {key -> wrapper handed out for a snapshot value}

    def __getitem__(self, key: Any) -> Any:
        tx = self._tx
        tx._check_active()
        if tx.serializable:
            tx._reads.add(self._path + (key,))
        local = self._local
        if key in local:
            value = local[key]
            if value is _DELETED:
                raise KeyError(key)
            return LocalDict(tx, self._path + (key,), value) if type(value) is dict else value
        child = self._children.get(key)
        if child is not None:
            return child
        value = self._base[key]
        adopted = tx._adopt(self._path + (key,), value)
        if adopted is not value:
            self._children[key] = adopted
        return adopted

    def __setitem__(self, key: Any, value: Any) -> None:
        self._tx._check_active()
        path = self._path + (key,)
        check_key(key, path)
        _validate(value, path)
        self._local[key] = value
        self._children.pop(key, None)
        self._tx._record(path, OP_SET, value)

    def __delitem__(self, key: Any) -> None:
        if key not in self:
            raise KeyError(key)
        self._local[key] = _DELETED
        self._children.pop(key, None)
        self._tx._record(self._path + (key,), OP_DELETE, None)

    def __contains__(self, key: object) -> bool:
        self._tx._check_active()
        self._tx._read(self._path + (key,))
        if key in self._local:
            return self._local[key] is not _DELETED
        return key in self._base

    def __iter__(self) -> Iterator[Any]:
        self._tx._check_active()
        self._tx._read(self._path)
        local = self._local
        for key in self._base:
            if local.get(key, None) is not _DELETED:
                yield key
        for key, value in list(local.items()):
            if value is not _DELETED and key not in self._base:
                yield key

    def __len__(self) -> int:
        self._tx._check_active()
        self._tx._read(self._path)
        count = len(self._base)
        for key, value in self._local.items():
            in_base = key in self._base
            count += (value is not _DELETED and not in_base) - (value is _DELETED and in_base)
        return count

    def _protobase_plain_(self) -> dict:
        return {key: self[key] for key in self}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (dict, MutableMapping, TreeDict)):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TxDict({self._protobase_plain_()!r})" if len(self) <= 20 else f"TxDict(<{len(self)} keys>)"

    # -- queries and indexes -----------------------------------------------------

    def where(self, expr: Expr | None = None) -> Query:
        """Records matching `expr` (see protobase.query), seeing this transaction's own writes."""
        self._tx._check_active()
        return Query(self, expr)

    def create_index(self, *fields: str) -> None:
        """Index the records' `field` (dotted for nested: "address.city"); built at commit.

        Several fields make one composite index, ordered by the first field, then
        the next: `create_index("city", "score")` answers `(F.city == X) & (F.score > Y)`
        by reading exactly the matching entries.
        """
        _record_index_op(self._tx, self._path, OP_CREATE_INDEX, _index_name(fields))

    def drop_index(self, *fields: str) -> None:
        """Remove the index on `fields` (as given to create_index) at commit."""
        _record_index_op(self._tx, self._path, OP_DROP_INDEX, _index_name(fields))

    @property
    def indexes(self) -> tuple[str, ...]:
        """The fields indexed in the snapshot this transaction reads."""
        return getattr(self._base, "indexes", ())

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        """The snapshot's indexes (protobase.query.QuerySource); query_changed_keys() says where they are stale."""
        indexes: Mapping[IndexName, IndexReader] = self._base.query_indexes()
        return indexes

    def query_changed_keys(self) -> frozenset[Any]:
        """Keys of this mapping that this transaction wrote, or wrote inside (protobase.query.QuerySource)."""
        depth = len(self._path)
        changed = set(self._local)
        for path in self._tx._ops:
            if path and path[0] is not _INDEX_OP and len(path) > depth and path[:depth] == self._path:
                changed.add(path[depth])
        return frozenset(changed)


_INDEX_OP = object()  # first element of the `_ops` key of an index operation


def _index_name(fields: tuple) -> str | tuple:
    """"city" for one field, ("city", "score") for a composite index."""
    if not fields:
        raise TypeError("create_index() needs at least one field name, e.g. create_index('city')")
    for field in fields:
        if not isinstance(field, str):
            raise TypeError(f"index fields are dotted names like 'address.city', got {field!r}")
        field_path(field)  # validates the name
    return fields[0] if len(fields) == 1 else tuple(fields)


def _record_index_op(tx: Transaction, path: tuple, code: int, field: str | tuple) -> None:
    if not path:
        raise ValueError("the root itself cannot be indexed; index a collection inside it, e.g. root['users']")
    tx._record((_INDEX_OP, path, field), code, field)


class LocalDict(MutableMapping):
    """A dict assigned in this transaction, read back through `tx.root`: the dict itself, plus queries.

    Changes go straight into the assigned dict, which the transaction stores
    whole at commit; `create_index` on it is recorded to run after that.
    """

    __slots__ = ("_tx", "_path", "_dict")
    _protobase_path_ = _wrapper_path

    def __init__(self, tx: Transaction, path: tuple, value: dict) -> None:
        self._tx = tx
        self._path = path
        self._dict = value  # the user's dict, stored at commit

    def __getitem__(self, key: Any) -> Any:
        value = self._dict[key]
        return LocalDict(self._tx, self._path + (key,), value) if type(value) is dict else value

    def __setitem__(self, key: Any, value: Any) -> None:
        self._tx._check_active()
        check_key(key, self._path + (key,))
        _validate(value, self._path + (key,))
        self._dict[key] = value

    def __delitem__(self, key: Any) -> None:
        self._tx._check_active()
        del self._dict[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def where(self, expr: Expr | None = None) -> Query:
        """Records matching `expr` (see protobase.query): a dict assigned in this transaction has no index."""
        return Query(self, expr)

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        """No indexes until the commit stores the dict (protobase.query.QuerySource)."""
        return NO_INDEXES

    def query_changed_keys(self) -> frozenset[Any]:
        """None: every record is read from the dict itself (protobase.query.QuerySource)."""
        return frozenset()

    def create_index(self, *fields: str) -> None:
        _record_index_op(self._tx, self._path, OP_CREATE_INDEX, _index_name(fields))

    def drop_index(self, *fields: str) -> None:
        _record_index_op(self._tx, self._path, OP_DROP_INDEX, _index_name(fields))


    def _protobase_plain_(self) -> dict:
        return self._dict

    def __eq__(self, other: object) -> bool:
        return self._dict == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._dict)


# -- small containers: tracked copies, written back whole --------------------------------


class _Owner:
    """Records a small container as written whole, at its path, when anything inside it changes."""

    __slots__ = ("tx", "path", "container")

    def __init__(self, tx: Transaction, path: tuple) -> None:
        self.tx = tx
        self.path = path  # where the container sits in the root
        self.container: Any = None  # the tracked container, set once built

    def __call__(self) -> None:
        self.tx._record(self.path, OP_SET, self.container)


def _notify(method: Callable) -> Callable:
    def mutator(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        _validate(self, self._path)  # a bad value fails on the line that stored it
        self._owner()
        return result

    mutator.__name__ = method.__name__
    return mutator


class TrackedDict(dict):
    """A dict inside a small list or set read in a transaction; changes mark the container written."""

    __slots__ = ("_owner", "_path")

    def _protobase_plain_(self) -> dict:
        return dict(self)


class TrackedList(list):
    """A small list read in a transaction; any change rewrites it whole."""

    __slots__ = ("_owner", "_path")

    def _protobase_plain_(self) -> list:
        return list(self)


class TrackedSet(set):
    """A small set read in a transaction; any change rewrites it whole."""

    __slots__ = ("_owner", "_path")

    def _protobase_plain_(self) -> set:
        return set(self)


for _cls, _base, _names in (
    (TrackedDict, dict, "__setitem__ __delitem__ __ior__ clear pop popitem setdefault update"),
    (TrackedList, list, "__setitem__ __delitem__ __iadd__ __imul__ append extend insert pop remove clear sort reverse"),
    (TrackedSet, set, "__ior__ __iand__ __isub__ __ixor__ add discard remove pop clear update "
                      "difference_update intersection_update symmetric_difference_update"),
):
    for _name in _names.split():
        setattr(_cls, _name, _notify(getattr(_base, _name)))


def _is_mutable_dataclass(value: Any) -> bool:
    return is_dataclass_instance(value) and not value.__dataclass_params__.frozen


def _set_tracked_attribute(self: Any, name: str, value: Any) -> None:
    plain_dataclass(type(self)).__setattr__(self, name, value)  # the class's own (object's, or the user's)
    _validate(self, self._tx_path_)  # a bad value fails on the line that stored it
    self._tx_owner_()


def _refuse_attribute_deletion(self: Any, name: str) -> None:
    raise EncodingError(f"cannot delete attribute {name!r} of the {type(self).__name__} at "
                        f"{format_path(self._tx_path_)}: a stored dataclass keeps every field; set it to None instead")


def _plain_dataclass_copy(self: Any) -> Any:
    return dataclass_copy(plain_dataclass(type(self)), dataclass_fields(self))


@functools.cache
def _tracked_dataclass(cls: type) -> type:
    """The class of `cls` instances read in a transaction: attribute changes report to the instance's owner."""
    return dataclass_variant(cls, {"__slots__": ("_tx_owner_", "_tx_path_"), "__setattr__": _set_tracked_attribute,
                                   "__delattr__": _refuse_attribute_deletion,
                                   "_protobase_plain_": _plain_dataclass_copy})


def _track(value: Any, owner: _Owner, path: tuple) -> Any:
    """A tracked mutable deep copy of a frozen small container or dataclass; every part reports to `owner`."""
    if isinstance(value, (dict, TreeDict)):
        tracked: Any = TrackedDict((key, _track(item, owner, path + (key,))) for key, item in value.items())
    elif isinstance(value, (list, TreeList)):
        tracked = TrackedList(_track(item, owner, path + (index,)) for index, item in enumerate(value))
    elif isinstance(value, (set, frozenset, TreeSet)):
        tracked = TrackedSet(value)
    elif isinstance(value, tuple):
        return thaw(value)
    elif _is_mutable_dataclass(value):
        fields = {name: _track(item, owner, path + (name,)) for name, item in dataclass_fields(value).items()}
        tracked = dataclass_copy(_tracked_dataclass(plain_dataclass(type(value))), fields)
        object.__setattr__(tracked, "_tx_owner_", owner)
        object.__setattr__(tracked, "_tx_path_", path)
        return tracked
    else:
        return value
    tracked._owner = owner
    tracked._path = path
    return tracked


def _tracked_whole(value: Any) -> bool:
    """True for an element a TxList copies tracked, so that a change inside it rewrites the element."""
    return isinstance(value, (dict, list, set, frozenset, TreeDict)) or _is_mutable_dataclass(value)


# -- large containers: element operations --------------------------------------------------


class TxList(MutableSequence):
    """A large (tree) list in a transaction: records element operations for the coordinator.

    Appends stay lazy; the first other change copies the list locally so this
    transaction reads its own writes.
    """

    _index_elements_ = True  # queries and indexes see its elements, as for a list
    _protobase_path_ = _wrapper_path

    def __init__(self, tx: Transaction, path: tuple, base: TreeList) -> None:
        self._tx = tx
        self._path = path
        self._base = base  # the snapshot's TreeList
        self._items: list | None = None  # local copy once a non-append change happened
        self._tail: list = []  # appended values while there is no local copy
        self._ops: list = []  # [[LIST_*, index, value]] in order
        self._whole = False  # True once reordered: the list is written whole at commit
        self._changed: dict[int, Any] = {}  # {id(element) -> element} of changed container elements

    def _op(self, code: int, index: Any, value: Any) -> None:
        self._tx._check_active()
        if not self._whole:
            self._ops.append([code, index, value])
        self._tx._record(self._path, _DEFERRED, self)

    def _wire_ops(self) -> list:
        if self._whole:
            return [[OP_SET, list(self._path), list(self._local())]]
        ops = list(self._ops)
        # A changed element is written where it stands after every insert and delete.
        for element in self._changed.values():
            index = next((i for i, item in enumerate(self._items) if item is element), None)
            if index is not None:
                ops.append([LIST_SET, index, element])
        return [[OP_LIST, list(self._path), ops]] if ops else []

    def _element_changed(self, element: Any) -> None:
        self._tx._check_active()
        self._changed[id(element)] = element
        self._tx._record(self._path, _DEFERRED, self)

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Sort in place; every position may move, so the list is written whole at commit."""
        self._local().sort(key=key, reverse=reverse)
        self._reordered()

    def reverse(self) -> None:
        """Reverse in place; the list is written whole at commit."""
        self._local().reverse()
        self._reordered()

    def _reordered(self) -> None:
        self._whole = True
        self._ops = []
        self._op(LIST_SET, None, None)

    def _local(self) -> list:
        if self._items is None:
            self._items = [self._adopt_element(i, v) for i, v in enumerate(self._base)] + self._tail
            self._tail = []
        return self._items

    def _adopt_element(self, index: int, value: Any) -> Any:
        # Positions move with inserts and deletes, so an element is not a stable key
        # path: a container element reports its changes to the list instead.
        if _tracked_whole(value):
            owner = _ElementOwner(self)
            owner.element = _track(value, owner, self._path + (index,))
            return owner.element
        return self._tx._adopt(self._path + (index,), value)

    def __len__(self) -> int:
        self._tx._read(self._path)
        return len(self._items) if self._items is not None else len(self._base) + len(self._tail)

    def __getitem__(self, index: Any) -> Any:
        self._tx._read(self._path)
        if isinstance(index, slice) or self._items is not None:
            return self._local()[index]
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError("list index out of range")
        if index >= len(self._base):
            return self._tail[index - len(self._base)]
        return self._local()[index] if _tracked_whole(self._base[index]) else self._base[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("slice assignment is not supported on large stored lists; assign a new list")
        _validate(value, self._path + (index,))
        items = self._local()
        items[index] = value
        self._op(LIST_SET, index % len(items), value)

    def __delitem__(self, index: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("slice deletion is not supported on large stored lists; assign a new list")
        items = self._local()
        del items[index]
        self._op(LIST_DELETE, index % (len(items) + 1), None)

    def insert(self, index: int, value: Any) -> None:
        _validate(value, self._path + (index,))
        items = self._local()
        length = len(items)
        position = max(0, min(length, index if index >= 0 else length + index))
        items.insert(position, value)
        self._op(LIST_INSERT, position, value)

    def append(self, value: Any) -> None:
        _validate(value, self._path + (len(self),))
        (self._items if self._items is not None else self._tail).append(value)
        self._op(LIST_APPEND, None, value)

    def extend(self, values: Iterable[Any]) -> None:
        for value in values:
            self.append(value)

    def _protobase_plain_(self) -> list:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, MutableSequence, TreeList)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TxList(<{len(self)} items>)"


class _ElementOwner:
    """Tells a TxList that one of its container elements changed."""

    __slots__ = ("txlist", "element")

    def __init__(self, txlist: TxList) -> None:
        self.txlist = txlist
        self.element: Any = None  # the tracked element, set once built

    def __call__(self) -> None:
        self.txlist._element_changed(self.element)


class TxSet(MutableSet):
    """A large (tree) set in a transaction: records additions and removals."""

    _index_elements_ = True  # queries and indexes see its elements, as for a set
    _protobase_path_ = _wrapper_path

    def __init__(self, tx: Transaction, path: tuple, base: TreeSet) -> None:
        self._tx = tx
        self._path = path
        self._base = base  # the snapshot's TreeSet
        self._added: set = set()  # elements added here, not in base
        self._removed: set = set()  # base elements removed here

    def __contains__(self, item: object) -> bool:
        self._tx._read(self._path)
        return item in self._added or (item not in self._removed and item in self._base)

    def __iter__(self) -> Iterator[Any]:
        self._tx._read(self._path)
        for item in self._base:
            if item not in self._removed:
                yield item
        yield from list(self._added)

    def __len__(self) -> int:
        self._tx._read(self._path)
        return len(self._base) - len(self._removed) + len(self._added)

    def add(self, item: Any) -> None:
        self._tx._check_active()
        check_key(item, self._path)
        if item in self._removed:
            self._removed.discard(item)
        elif item not in self._base:
            self._added.add(item)
        self._tx._record(self._path, _DEFERRED, self)

    def discard(self, item: Any) -> None:
        self._tx._check_active()
        if item in self._added:
            self._added.discard(item)
        elif item in self._base:
            self._removed.add(item)
        self._tx._record(self._path, _DEFERRED, self)

    def _wire_ops(self) -> list:
        ops = []
        if self._removed:
            ops.append([OP_SET_DISCARD, list(self._path), list(self._removed)])
        if self._added:
            ops.append([OP_SET_ADD, list(self._path), list(self._added)])
        return ops

    @classmethod
    def _from_iterable(cls, iterable: Iterable[Any]) -> set:
        return set(iterable)

    def _protobase_plain_(self) -> set:
        return set(self)

    def __repr__(self) -> str:
        return f"TxSet(<{len(self)} elements>)"

